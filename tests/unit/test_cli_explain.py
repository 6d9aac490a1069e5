"""`outbox explain`: the knowledge base for people and scripts (no database needed)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from worker.cli import main


def test_explain_json_has_the_documented_keys():
    result = CliRunner().invoke(
        main, ["explain", "550 5.1.1 <ghost@example.com>: no such user", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"reply", "code", "enhanced", "verdict", "fallback", "meaning", "advice"}
    assert (data["code"], data["enhanced"], data["verdict"], data["fallback"]) == (
        550,
        "5.1.1",
        "recipient",
        False,
    )


def test_explain_several_replies_from_arguments_and_from_stdin():
    replies = [
        "535 5.7.8 Authentication credentials invalid",
        "451 4.7.1 Greylisted",
        "111 Connection refused",
    ]
    by_args = CliRunner().invoke(main, ["explain", *replies, "--json"])
    by_stdin = CliRunner().invoke(main, ["explain", "--json"], input="\n".join(replies) + "\n")
    for result in (by_args, by_stdin):
        assert result.exit_code == 0, result.output
        verdicts = [r["verdict"] for r in json.loads(result.output)]
        assert verdicts == ["account", "retry", "account"]


def test_explain_for_people_shows_meaning_and_what_to_do():
    result = CliRunner().invoke(main, ["explain", "550 5.7.1 blocked using Spamhaus"])
    assert result.exit_code == 0
    assert "verdict" in result.output and "account" in result.output
    assert "what to do" in result.output


def test_explain_multiline_reply_and_stage():
    result = CliRunner().invoke(
        main,
        [
            "explain",
            "--stage",
            "rcpt",
            "--json",
            "550-5.1.1 The account does not exist.\\r\\n550 5.1.1 See",
        ],
    )
    data = json.loads(result.output)
    assert data["enhanced"] == "5.1.1" and data["verdict"] == "recipient"


def test_explain_of_text_that_is_no_reply_says_so_and_exits_1():
    result = CliRunner().invoke(main, ["explain", "hello"])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "'hello' is not an SMTP reply" in said
    assert "will retry" not in said and "verdict" not in said


def test_explain_json_of_several_marks_the_one_that_is_no_reply():
    result = CliRunner().invoke(main, ["explain", "--json", "451 4.7.1 Greylisted", "hello"])
    assert result.exit_code == 1
    first, second = json.loads(result.output)
    assert first["verdict"] == "retry"
    assert set(second) == {"reply", "error"} and "not an SMTP reply" in second["error"]


def test_explain_answers_connection_errors_from_the_logs_as_the_engine_does():
    texts = {
        "[Errno -2] Name or service not known": "account",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed": "account",
        "[Errno 111] Connection refused": "account",
        "Connection reset by peer": "retry",
        "timed out": "retry",
    }
    result = CliRunner().invoke(main, ["explain", "--json", *texts])
    assert result.exit_code == 0, result.output
    assert [r["verdict"] for r in json.loads(result.output)] == list(texts.values())
    dns = CliRunner().invoke(main, ["explain", "[Errno -2] Name or service not known"])
    assert "does not exist in DNS" in " ".join(dns.output.split())
