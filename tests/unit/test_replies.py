"""Unit tests for the SMTP reply knowledge base (worker.replies, worker.reply_codes).

Expected verdicts are written by hand from the meaning of each code, not read off the
table, so a wrong table entry fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import reply_codes
from worker.replies import (
    ConnectionFailure,
    Explanation,
    Reply,
    SMTPCode,
    Stage,
    Verdict,
    classify,
    connection_reply,
    explain_text,
    parse_reply,
    reply_from,
)

OK, RETRY, ACCOUNT = Verdict.OK, Verdict.RETRY, Verdict.ACCOUNT
RECIPIENT, MESSAGE = Verdict.RECIPIENT, Verdict.MESSAGE
CONNECT, AUTH, MAIL, RCPT, DATA = Stage.CONNECT, Stage.AUTH, Stage.MAIL, Stage.RCPT, Stage.DATA

SEED = Path(__file__).parents[3] / "shared/seed/smtp-failures.txt"

# Every code of the seed table (plus 534, 535, 555), at a stage where it typically
# arrives, with the verdict it deserves.
SEED_VERDICTS: list[tuple[int, Stage | None, Verdict]] = [
    (101, CONNECT, ACCOUNT),
    (111, CONNECT, ACCOUNT),
    (211, None, OK),
    (214, None, OK),
    (220, CONNECT, OK),
    (221, None, OK),
    (250, DATA, OK),
    (251, RCPT, OK),
    (252, RCPT, OK),
    (354, DATA, OK),
    (420, DATA, RETRY),
    (421, CONNECT, RETRY),
    (422, RCPT, RETRY),
    (431, DATA, RETRY),
    (432, DATA, RETRY),
    (441, DATA, RETRY),
    (442, DATA, RETRY),
    (446, DATA, RETRY),
    (447, DATA, RETRY),
    (449, DATA, RETRY),
    (450, RCPT, RETRY),
    (451, DATA, RETRY),
    (452, RCPT, RETRY),
    (471, DATA, RETRY),
    (500, None, ACCOUNT),
    (501, None, ACCOUNT),
    (502, None, ACCOUNT),
    (503, MAIL, ACCOUNT),
    (504, AUTH, ACCOUNT),
    (510, RCPT, RECIPIENT),
    (511, RCPT, RECIPIENT),
    (512, RCPT, RECIPIENT),
    (513, RCPT, RECIPIENT),
    (523, DATA, MESSAGE),
    (530, AUTH, ACCOUNT),
    (534, AUTH, ACCOUNT),
    (535, AUTH, ACCOUNT),
    (541, DATA, RECIPIENT),
    (550, RCPT, RECIPIENT),
    (551, RCPT, ACCOUNT),
    (552, DATA, MESSAGE),
    (553, RCPT, RECIPIENT),
    (554, DATA, ACCOUNT),
    (555, MAIL, ACCOUNT),
]
SEED_CODES = [code for code, _, _ in SEED_VERDICTS]

# RFC 3463 enhanced details (subject, detail) with the verdict of their permanent (5.x.x)
# form; the transient (4.x.x) form is always a retry.
ENHANCED_VERDICTS: list[tuple[int, int, Verdict]] = [
    (0, 0, ACCOUNT),
    (1, 0, RECIPIENT),
    (1, 1, RECIPIENT),
    (1, 2, RECIPIENT),
    (1, 3, RECIPIENT),
    (1, 6, RECIPIENT),
    (1, 7, ACCOUNT),
    (1, 8, ACCOUNT),
    (1, 10, RECIPIENT),
    (2, 0, RECIPIENT),
    (2, 1, RECIPIENT),
    (2, 2, RECIPIENT),
    (2, 3, MESSAGE),
    (2, 4, RECIPIENT),
    (3, 0, ACCOUNT),
    (3, 1, ACCOUNT),
    (3, 2, ACCOUNT),
    (3, 4, MESSAGE),
    (4, 0, ACCOUNT),
    (4, 1, ACCOUNT),
    (4, 2, ACCOUNT),
    (4, 3, ACCOUNT),
    (4, 4, RECIPIENT),
    (4, 5, ACCOUNT),
    (4, 6, MESSAGE),
    (4, 7, ACCOUNT),
    (5, 0, ACCOUNT),
    (5, 1, ACCOUNT),
    (5, 2, ACCOUNT),
    (5, 3, MESSAGE),
    (5, 4, ACCOUNT),
    (6, 0, MESSAGE),
    (6, 1, MESSAGE),
    (6, 2, MESSAGE),
    (6, 3, MESSAGE),
    (7, 0, ACCOUNT),
    (7, 1, ACCOUNT),
    (7, 8, ACCOUNT),
    (7, 9, ACCOUNT),
    (7, 23, ACCOUNT),
    (7, 25, ACCOUNT),
    (7, 26, ACCOUNT),
    (7, 27, ACCOUNT),
]

CONNECTION_VERDICTS: list[tuple[ConnectionFailure, Verdict]] = [
    (ConnectionFailure.REFUSED, ACCOUNT),
    (ConnectionFailure.UNREACHABLE, ACCOUNT),
    (ConnectionFailure.DNS, ACCOUNT),
    (ConnectionFailure.TLS, ACCOUNT),
    (ConnectionFailure.CERTIFICATE, ACCOUNT),
    (ConnectionFailure.TIMEOUT, RETRY),
    (ConnectionFailure.DROPPED, RETRY),
]


def _assert_consistent(explanation: Explanation) -> None:
    assert explanation.meaning.strip()
    assert explanation.advice.strip()
    assert explanation.fallback is (explanation.verdict in (RETRY, ACCOUNT))


# --- the seed table ---------------------------------------------------------------------


def test_seed_expectations_cover_the_seed_file() -> None:
    if not SEED.exists():
        pytest.skip(f"seed file missing: {SEED}")
    in_seed: set[int] = set()
    for line in SEED.read_text().splitlines():
        if "|" not in line:
            continue
        first = line.split("|")[0].strip()
        in_seed.update(int(code) for code in re.findall(r"\b\d{3}\b", first))
    assert in_seed
    assert in_seed <= set(SEED_CODES)


@pytest.mark.parametrize("code", SEED_CODES)
def test_every_seed_code_has_an_entry(code: int) -> None:
    if code in reply_codes.ERRNO_FAILURES:
        info = reply_codes.CONNECTION[reply_codes.ERRNO_FAILURES[code]]
    else:
        info = reply_codes.BASIC[code]
    assert info.meaning.strip()
    assert info.advice.strip()


@pytest.mark.parametrize(("code", "stage", "verdict"), SEED_VERDICTS)
def test_seed_code_verdict(code: int, stage: Stage | None, verdict: Verdict) -> None:
    explanation = explain_text(str(code), stage)
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


@pytest.mark.parametrize(("code", "stage", "verdict"), SEED_VERDICTS)
def test_seed_code_verdict_from_smtplib_tuple(
    code: int, stage: Stage | None, verdict: Verdict
) -> None:
    if code in reply_codes.ERRNO_FAILURES:
        reply = parse_reply(f"{code} failure")
    else:
        reply = reply_from(code, b"", stage)
    assert classify(reply, stage).verdict is verdict


def test_smtp_code_enum_names_known_codes() -> None:
    assert SMTPCode.MAILBOX_UNAVAILABLE == 550
    assert SMTPCode.AUTH_FAILED == 535
    assert set(SMTPCode) <= set(reply_codes.BASIC)


# --- enhanced status codes --------------------------------------------------------------


@pytest.mark.parametrize(("subject", "detail", "verdict"), ENHANCED_VERDICTS)
def test_enhanced_detail_permanent(subject: int, detail: int, verdict: Verdict) -> None:
    assert (subject, detail) in reply_codes.ENHANCED_DETAILS
    explanation = classify(Reply(554, f"5.{subject}.{detail}"))
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


@pytest.mark.parametrize(("subject", "detail", "verdict"), ENHANCED_VERDICTS)
def test_enhanced_detail_transient_is_retry(subject: int, detail: int, verdict: Verdict) -> None:
    explanation = classify(Reply(451, f"4.{subject}.{detail}"))
    assert explanation.verdict is RETRY
    assert explanation.fallback is True
    _assert_consistent(explanation)


@pytest.mark.parametrize(
    ("subject", "verdict"),
    [
        (0, ACCOUNT),
        (1, RECIPIENT),
        (2, RECIPIENT),
        (3, ACCOUNT),
        (4, ACCOUNT),
        (5, ACCOUNT),
        (6, MESSAGE),
        (7, ACCOUNT),
    ],
)
def test_unknown_detail_falls_back_to_subject(subject: int, verdict: Verdict) -> None:
    assert classify(Reply(554, f"5.{subject}.999")).verdict is verdict


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        ("550 5.1.1 user unknown", RECIPIENT),
        ("550 5.7.1 Service unavailable; client host blocked using Spamhaus", ACCOUNT),
        ("452 4.2.2 mailbox full", RETRY),
        ("552 5.2.2 over quota", RECIPIENT),
        ("552 5.3.4 message too big", MESSAGE),
        ("554 5.7.26 DMARC", ACCOUNT),
        ("535 5.7.8 auth failed", ACCOUNT),
        ("530 5.7.0 Must issue a STARTTLS command first", ACCOUNT),
        ("550 5.7.23 SPF validation failed", ACCOUNT),
        ("550 5.7.25 reverse DNS failed", ACCOUNT),
        ("550 5.7.27 sender domain has null MX", ACCOUNT),
        ("554 5.7.1 <a@b.example>: Relay access denied", ACCOUNT),
        ("550 5.7.606 Access denied, banned sending IP [192.0.2.1]", ACCOUNT),
        ("554 5.6.0 Message content rejected", MESSAGE),
        ("550 5.2.1 mailbox disabled", RECIPIENT),
        ("550 5.4.6 routing loop detected", MESSAGE),
        ("550 5.1.2 bad destination system", RECIPIENT),
        ("535 5.7.3 Authentication unsuccessful", ACCOUNT),
    ],
)
def test_enhanced_code_decides(raw: str, verdict: Verdict) -> None:
    explanation = explain_text(raw)
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


def test_blocklisted_ip_may_use_backup() -> None:
    explanation = explain_text("550 5.7.1 Service unavailable; client host blocked using Spamhaus")
    assert explanation.verdict is ACCOUNT
    assert explanation.fallback is True
    assert "blocklist" in explanation.meaning.lower()


def test_starttls_required_is_explained_as_encryption() -> None:
    explanation = explain_text("530 5.7.0 Must issue a STARTTLS command first", AUTH)
    assert "encrypt" in explanation.meaning.lower()


def test_enhanced_class_decides_transience_over_basic_class() -> None:
    assert explain_text("550 4.2.2 mailbox full").verdict is RETRY
    assert explain_text("452 5.2.2 mailbox full").verdict is RECIPIENT


def test_enhanced_detail_is_more_specific_than_basic_meaning() -> None:
    enhanced = explain_text("550 5.2.2 sorry", RCPT)
    basic = explain_text("550 sorry", RCPT)
    assert enhanced.meaning != basic.meaning
    assert "full" in enhanced.meaning


def test_transient_reply_with_lasting_cause_says_it_will_be_retried() -> None:
    explanation = explain_text("452 4.2.2 mailbox full", RCPT)
    assert explanation.advice.startswith(reply_codes.RETRY_NOTE)
    assert "room" in explanation.advice


# --- parsing ----------------------------------------------------------------------------

GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser"
)


def test_multiline_reply_is_parsed_and_classified() -> None:
    reply = parse_reply(GMAIL_NO_SUCH_USER, RCPT)
    assert reply.code == 550
    assert reply.enhanced == "5.1.1"
    assert reply.stage is RCPT
    assert reply.text.startswith("The email account that you tried to reach")
    assert "5.1.1" not in reply.text
    assert "NoSuchUser" in reply.text
    explanation = classify(reply)
    assert explanation.verdict is RECIPIENT
    assert explanation.fallback is False


def test_multiline_reply_through_explain_text() -> None:
    raw = "421-4.7.0 Try again later, closing connection.\n421 4.7.0 (rate limited)"
    explanation = explain_text(raw, CONNECT)
    assert explanation.reply.code == 421
    assert explanation.reply.enhanced == "4.7.0"
    assert explanation.verdict is RETRY


@pytest.mark.parametrize(
    ("raw", "failure"),
    [
        ("101 Network is unreachable", ConnectionFailure.UNREACHABLE),
        ("111 Connection refused", ConnectionFailure.REFUSED),
        ("111", ConnectionFailure.REFUSED),
        ("[Errno 111] Connection refused", ConnectionFailure.REFUSED),
        ("[Errno 101] Network is unreachable", ConnectionFailure.UNREACHABLE),
    ],
)
def test_errno_values_are_connection_failures(raw: str, failure: ConnectionFailure) -> None:
    reply = parse_reply(raw, DATA)
    assert reply.code is None
    assert reply.failure is failure
    assert reply.stage is CONNECT
    explanation = classify(reply)
    assert explanation.verdict is ACCOUNT
    assert explanation.fallback is True
    assert explanation.as_dict()["code"] is None


def test_errno_reply_keeps_its_text() -> None:
    assert parse_reply("111 Connection refused").text == "Connection refused"


def test_text_without_code_is_kept() -> None:
    reply = parse_reply("something odd happened", MAIL)
    assert reply == Reply(code=None, text="something odd happened", stage=MAIL)
    explanation = classify(reply)
    assert explanation.verdict is RETRY
    _assert_consistent(explanation)


def test_reply_from_smtplib_style() -> None:
    reply = reply_from(550, b"5.1.1 <x@example.com>: Recipient address rejected", RCPT)
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert classify(reply).verdict is RECIPIENT


# --- connection failures ----------------------------------------------------------------


@pytest.mark.parametrize(("failure", "verdict"), CONNECTION_VERDICTS)
def test_connection_failures(failure: ConnectionFailure, verdict: Verdict) -> None:
    reply = connection_reply(failure, "details")
    assert reply == Reply(code=None, text="details", stage=CONNECT, failure=failure)
    explanation = classify(reply)
    assert explanation.verdict is verdict
    assert explanation.fallback is True
    _assert_consistent(explanation)


def test_connection_failures_all_have_entries() -> None:
    assert {failure.value for failure in ConnectionFailure} == set(reply_codes.CONNECTION)


# --- stage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stage", "verdict"),
    [
        ("501 5.5.4 Syntax error in parameters", RCPT, RECIPIENT),
        ("501 5.5.4 Syntax error in parameters", MAIL, ACCOUNT),
        ("501 Syntax error", RCPT, RECIPIENT),
        ("501 Syntax error", MAIL, ACCOUNT),
        ("553 mailbox name not allowed", RCPT, RECIPIENT),
        ("553 mailbox name not allowed", MAIL, ACCOUNT),
        ("550 5.1.1 unknown", MAIL, ACCOUNT),
        ("550 rejected", MAIL, ACCOUNT),
        ("550 rejected", DATA, ACCOUNT),
        ("501 5.5.2 bad address syntax", RCPT, RECIPIENT),
        ("550 5.4.4 unable to route", RCPT, RECIPIENT),
        ("530 authentication required", AUTH, ACCOUNT),
        ("535 account disabled", AUTH, ACCOUNT),
        ("554 5.1.1 user unknown", AUTH, ACCOUNT),
        ("552 5.3.4 size limit", MAIL, MESSAGE),
        ("554 no SMTP service here", CONNECT, ACCOUNT),
        ("554 recipient rejected", RCPT, RECIPIENT),
    ],
)
def test_stage_rules(raw: str, stage: Stage, verdict: Verdict) -> None:
    explanation = explain_text(raw, stage)
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


def test_stage_argument_overrides_reply_stage() -> None:
    reply = parse_reply("501 bad address", MAIL)
    assert classify(reply).verdict is ACCOUNT
    assert classify(reply, RCPT).verdict is RECIPIENT


def test_sender_refusal_is_explained_as_the_sender() -> None:
    explanation = explain_text("550 5.1.1 unknown", MAIL)
    assert "sender" in explanation.meaning.lower()


# --- text hints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stage", "verdict"),
    [
        ("451 Greylisted, please try again in 5 minutes", RCPT, RETRY),
        ("550 Relay access denied", RCPT, ACCOUNT),
        ("554 Your IP is listed on a blacklist", CONNECT, ACCOUNT),
        ("554 Message rejected as spam", DATA, ACCOUNT),
        ("554 blocked", DATA, ACCOUNT),
        ("550 User unknown", None, RECIPIENT),
        ("550 Requested action not taken: mailbox unavailable", RCPT, RECIPIENT),
        ("550 No such user here", RCPT, RECIPIENT),
        ("550 Address does not exist", RCPT, RECIPIENT),
        ("550 5.7.1 Unauthenticated email is not accepted due to DMARC policy", DATA, ACCOUNT),
        ("550 SPF check failed", DATA, ACCOUNT),
        ("552 too many recipients", RCPT, RETRY),
        ("552 mailbox full", RCPT, RECIPIENT),
        ("550 Message size exceeds fixed maximum message size", DATA, MESSAGE),
        ("550 Virus found in attachment", DATA, MESSAGE),
        ("421 4.7.0 Too many connections from your IP", CONNECT, RETRY),
        ("421 rate limit exceeded", CONNECT, RETRY),
    ],
)
def test_text_hints(raw: str, stage: Stage | None, verdict: Verdict) -> None:
    explanation = explain_text(raw, stage)
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


def test_greylisting_is_explained() -> None:
    explanation = explain_text("451 4.7.1 Greylisted, please try again later", RCPT)
    assert explanation.verdict is RETRY
    assert "greylisting" in explanation.meaning.lower()


def test_specific_code_is_not_overridden_by_text() -> None:
    # The text says "disabled", but 535 can only be about the login.
    assert explain_text("535 account disabled").verdict is ACCOUNT
    # The text says "blocked", but 5.1.1 names the cause.
    assert explain_text("550 5.1.1 blocked: no such user").verdict is RECIPIENT


# --- unknown codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stage", "verdict"),
    [
        ("499 something", None, RETRY),
        ("499 something", RCPT, RETRY),
        ("599 something", RCPT, RECIPIENT),
        ("599 something", DATA, ACCOUNT),
        ("599 something", None, ACCOUNT),
        ("299 fine", None, OK),
        ("399 go on", DATA, OK),
        ("558 5.9.9 odd", RCPT, RECIPIENT),
        ("458 4.9.9 odd", RCPT, RETRY),
    ],
)
def test_unknown_codes(raw: str, stage: Stage | None, verdict: Verdict) -> None:
    explanation = explain_text(raw, stage)
    assert explanation.verdict is verdict
    _assert_consistent(explanation)


# --- invariants over everything the knowledge base can say ------------------------------


def _every_reply() -> Iterator[tuple[Reply, Stage | None]]:
    stages: list[Stage | None] = [None, *Stage]
    for stage in stages:
        for code in reply_codes.BASIC:
            yield Reply(code, text="x"), stage
        for subject, detail in reply_codes.ENHANCED_DETAILS:
            yield Reply(554, f"5.{subject}.{detail}"), stage
            yield Reply(451, f"4.{subject}.{detail}"), stage
        for _, hint in reply_codes.HINTS:
            yield Reply(550, text=hint.meaning), stage
        for failure in ConnectionFailure:
            yield connection_reply(failure), stage


def test_every_explanation_is_complete_and_consistent() -> None:
    count = 0
    for reply, stage in _every_reply():
        explanation = classify(reply, stage)
        _assert_consistent(explanation)
        assert set(explanation.as_dict()) == {
            "code",
            "enhanced",
            "verdict",
            "fallback",
            "meaning",
            "advice",
        }
        count += 1
    assert count > 500


def test_as_dict() -> None:
    explanation = explain_text("552 5.2.2 over quota", RCPT)
    assert explanation.as_dict() == {
        "code": 552,
        "enhanced": "5.2.2",
        "verdict": "recipient",
        "fallback": False,
        "meaning": explanation.meaning,
        "advice": explanation.advice,
    }


def test_meaning_does_not_repeat_server_text() -> None:
    explanation = explain_text("550 5.1.1 zq-unique-server-words", RCPT)
    assert "zq-unique-server-words" not in explanation.meaning
    assert explanation.reply.text == "zq-unique-server-words"


# --- our own words ----------------------------------------------------------------------


def _all_infos() -> Iterator[reply_codes.Info]:
    tables = [
        reply_codes.BASIC.values(),
        reply_codes.ENHANCED_SUBJECTS.values(),
        reply_codes.ENHANCED_DETAILS.values(),
        reply_codes.CONNECTION.values(),
        reply_codes.SENDER_SIDE.values(),
        [hint for _, hint in reply_codes.HINTS],
        [
            reply_codes.UNKNOWN_CONNECTION,
            reply_codes.UNKNOWN_OK,
            reply_codes.UNKNOWN_TRANSIENT,
            reply_codes.UNKNOWN_PERMANENT,
        ],
    ]
    for table in tables:
        for info in table:
            yield info
            yield from info.stages.values()


def _our_texts() -> list[str]:
    texts = [reply_codes.RETRY_NOTE]
    for info in _all_infos():
        texts += [info.meaning, info.advice]
    return texts


def test_every_entry_has_a_valid_verdict_and_texts() -> None:
    for info in _all_infos():
        assert Verdict(info.verdict)
        assert info.meaning.strip()
        assert info.advice.strip()


@pytest.mark.parametrize("word", ["turbosmtp", "professional smtp", "winroute", "commusoft"])
def test_no_vendor_advertising(word: str) -> None:
    for text in _our_texts():
        assert word not in text.lower()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def test_no_long_run_copied_from_seed() -> None:
    if not SEED.exists():
        pytest.skip(f"seed file missing: {SEED}")
    run = 8
    seed_runs: set[tuple[str, ...]] = set()
    for line in SEED.read_text().splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not re.match(r"\s*\d{3}", cells[0]):
            continue
        for cell in cells[1:3]:
            words = _words(cell)
            seed_runs.update(tuple(words[i : i + run]) for i in range(len(words) - run + 1))
    assert seed_runs
    for text in _our_texts():
        words = _words(text)
        for i in range(len(words) - run + 1):
            assert tuple(words[i : i + run]) not in seed_runs, text


@pytest.mark.parametrize("stage", [Stage.AUTH, Stage.MAIL])
def test_missing_server_capability_is_the_accounts_problem(stage):
    # e.g. the server offers no AUTH, or no SMTPUTF8 for a non-ASCII address: no reply
    # code, no broken connection, and retrying will not change it.
    explanation = classify(
        Reply(
            code=None,
            text="server does not offer AUTH",
            stage=stage,
            failure=ConnectionFailure.UNSUPPORTED,
        )
    )
    assert explanation.verdict is Verdict.ACCOUNT and explanation.fallback is True
    assert "login" in explanation.advice.lower()
