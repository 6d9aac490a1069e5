"""The SMTP reply knowledge base, as data: what each reply means and what to do about it.

This module owns the facts only -- basic reply codes (RFC 5321 plus the vendor codes
seen in practice), RFC 3463 enhanced status codes by subject and detail, connection
failures below SMTP, and hints read off the server's own text. Every text is written
for the account's user: the business whose SMTP server sent (or refused) the mail.

The decision logic that picks among these entries lives in :mod:`worker.replies`.
Verdicts and stages are spelled as the string values of ``Verdict`` and ``Stage``
there, so this module imports nothing from the rest of the worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

VerdictName = Literal["ok", "retry", "account", "recipient", "message"]
StageName = Literal["connect", "auth", "mail", "rcpt", "data"]


@dataclass(frozen=True)
class Info:
    """What one code (or hint) means, and what the user should do about it."""

    verdict: VerdictName
    meaning: str
    advice: str
    #: The code covers several unrelated causes, so the server's text may say better.
    vague: bool = False
    #: Replaces this entry when the reply came at that stage of the conversation.
    stages: Mapping[StageName, Info] = field(default_factory=dict, compare=False, hash=False)


class SMTPCode(IntEnum):
    """Basic SMTP reply codes this knowledge base knows (names in aiosmtplib's style)."""

    SYSTEM_STATUS = 211
    HELP_MESSAGE = 214
    READY = 220
    CLOSING = 221
    COMPLETED = 250
    WILL_FORWARD = 251
    CANNOT_VERIFY = 252
    AUTH_CONTINUE = 334
    START_INPUT = 354
    GROUPWISE_TIMEOUT = 420
    SERVICE_UNAVAILABLE = 421
    MAILBOX_OVER_LIMIT = 422
    SYSTEM_STORAGE = 431
    EXCHANGE_QUEUE_STOPPED = 432
    NO_RESPONSE = 441
    CONNECTION_DROPPED = 442
    HOP_COUNT_EXCEEDED = 446
    TIMED_OUT = 447
    EXCHANGE_ROUTING_ERROR = 449
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    TEMPORARILY_UNAVAILABLE = 454
    PARAMETERS_UNAVAILABLE = 455
    LOCAL_SPAM_FILTER = 471
    UNRECOGNIZED_COMMAND = 500
    SYNTAX_ERROR = 501
    NOT_IMPLEMENTED = 502
    BAD_SEQUENCE = 503
    PARAMETER_NOT_IMPLEMENTED = 504
    BAD_ADDRESS = 510
    NO_SUCH_MAILBOX = 511
    DOMAIN_NOT_FOUND = 512
    ADDRESS_TYPE_INCORRECT = 513
    NO_MAIL_ACCEPTED = 521
    SIZE_EXCEEDED = 523
    AUTH_REQUIRED = 530
    AUTH_TOO_WEAK = 534
    AUTH_FAILED = 535
    ENCRYPTION_REQUIRED = 538
    REJECTED_AS_SPAM = 541
    MAILBOX_UNAVAILABLE = 550
    USER_NOT_LOCAL = 551
    STORAGE_EXCEEDED = 552
    MAILBOX_NAME_INVALID = 553
    TRANSACTION_FAILED = 554
    PARAMETERS_NOT_RECOGNIZED = 555
    DOMAIN_REFUSES_MAIL = 556


#: Prepended to the advice when a reply is transient but its entry describes a lasting
#: cause: the user learns that nothing is lost yet, then what to look at.
RETRY_NOTE = (
    "The server called this temporary, so sending will be retried automatically; if it "
    "keeps failing, here is what to do."
)

# Shared wording, reused by several codes below.
_NOTHING_TO_DO = "Nothing to do: this is a normal part of sending."
_RETRIED = "Sending will be retried automatically."
_CHECK_RECIPIENT = (
    "Check the address for typing mistakes, or ask the recipient (by phone or another "
    "address) for the right one, then send again."
)
_REDUCE_SIZE = (
    "Make the message smaller -- usually by removing or compressing attachments, or by "
    "sharing large files as a link -- then send again."
)
_LOG_IN = (
    "Open the SMTP settings of your account and enter the username and password of your "
    "mail server. Many providers need an app password when two-step login is turned on."
)
_TURN_ON_TLS = (
    "Turn on encryption in your SMTP settings: STARTTLS on port 587, or SSL/TLS on port 465."
)
_AUTHENTICATE_DOMAIN = (
    "Publish SPF and DMARC records for your domain and have your mail server sign with "
    "DKIM; your mail provider's help pages give the exact DNS records to add."
)
_CHECK_BLOCKLISTS = (
    "Look up your mail server's IP address on a blocklist checker (Spamhaus, MXToolbox), "
    "find out why it was listed -- often a hacked mailbox or a sudden bulk mailing -- fix "
    "that, and request removal. Your mail provider can help if it is their IP."
)
_ASK_PROVIDER = "If it persists, ask your mail provider to look into it."


# --- Basic reply codes --------------------------------------------------------------

_SENDER_REJECTED = Info(
    "account",
    "Your mail server refused the sender (From) address of the message.",
    "Check the From address in your settings: it must be a complete address on a domain "
    "your server is allowed to send for.",
)

BASIC: dict[int, Info] = {
    SMTPCode.SYSTEM_STATUS: Info(
        "ok", "The server answered with a report about its own status.", _NOTHING_TO_DO
    ),
    SMTPCode.HELP_MESSAGE: Info(
        "ok", "The server sent help text, such as a link to its documentation.", _NOTHING_TO_DO
    ),
    SMTPCode.READY: Info(
        "ok", "The server greeted the connection and is ready to take mail.", _NOTHING_TO_DO
    ),
    SMTPCode.CLOSING: Info(
        "ok", "The server is ending the session in an orderly way.", _NOTHING_TO_DO
    ),
    SMTPCode.COMPLETED: Info(
        "ok",
        "The server accepted the request; for a message, it now takes charge of delivering it.",
        _NOTHING_TO_DO,
    ),
    SMTPCode.WILL_FORWARD: Info(
        "ok",
        "The recipient lives on another server; this one accepted the message and passes it on.",
        _NOTHING_TO_DO,
    ),
    SMTPCode.CANNOT_VERIFY: Info(
        "ok",
        "The server could not confirm that the recipient exists, but accepted the message "
        "and will attempt delivery.",
        "Nothing to do now. If the recipient reports that nothing arrived, double-check "
        "the address.",
    ),
    SMTPCode.AUTH_CONTINUE: Info(
        "ok", "The server is asking for the next step of the login.", _NOTHING_TO_DO
    ),
    SMTPCode.START_INPUT: Info(
        "ok",
        "The server accepted the sender and recipients and is waiting for the message itself.",
        _NOTHING_TO_DO,
    ),
    SMTPCode.GROUPWISE_TIMEOUT: Info(
        "retry",
        "A GroupWise mail server timed out while the message was being transferred; a "
        "firewall on the receiving side or a hardware fault is the usual cause.",
        f"{_RETRIED} If it keeps happening, ask your mail provider to check the path to "
        "that destination.",
    ),
    SMTPCode.SERVICE_UNAVAILABLE: Info(
        "retry",
        "The server is unavailable for now and closed the connection -- for example too "
        "many connections at once, maintenance, or a passing overload.",
        f"{_RETRIED} If it lasts for hours, ask your mail provider whether you are hitting "
        "a connection or sending limit.",
        vague=True,
    ),
    SMTPCode.MAILBOX_OVER_LIMIT: Info(
        "retry",
        "The recipient's mailbox is over its storage limit and cannot take new mail for now.",
        f"{_RETRIED} If it does not clear, tell the recipient through another channel that "
        "their mailbox needs emptying.",
    ),
    SMTPCode.SYSTEM_STORAGE: Info(
        "retry",
        "The receiving server is short of disk space or memory, often because a lot of "
        "mail is arriving for the same domain.",
        f"{_RETRIED} When mailing many people at one domain, spread the sending over time "
        "in smaller groups.",
    ),
    SMTPCode.EXCHANGE_QUEUE_STOPPED: Info(
        "retry",
        "A Microsoft Exchange server has stopped its queue for incoming mail, usually "
        "because of a connection problem on its side.",
        f"{_RETRIED} If it persists, the people running that Exchange server need to "
        "restart its queue.",
    ),
    SMTPCode.NO_RESPONSE: Info(
        "retry",
        "The recipient's mail server did not respond.",
        f"{_RETRIED} Nothing to change on your side unless it happens for every recipient.",
    ),
    SMTPCode.CONNECTION_DROPPED: Info(
        "retry",
        "The connection broke while the message was being sent.",
        f"{_RETRIED} If it happens often, check the network path to your mail server: "
        "routers, firewalls and unstable links are the usual suspects.",
    ),
    SMTPCode.HOP_COUNT_EXCEEDED: Info(
        "retry",
        "The message passed through too many mail servers, a sign that it is going round "
        "in a loop between them.",
        f"{_RETRIED} A loop rarely fixes itself: check forwarding rules on your server, and "
        "ask your mail provider or the recipient to check theirs.",
    ),
    SMTPCode.TIMED_OUT: Info(
        "retry",
        "Sending timed out on the receiving side, most often because one message lists "
        "more recipients than that server allows.",
        f"{_RETRIED} If it keeps failing, send to fewer recipients per message.",
    ),
    SMTPCode.EXCHANGE_ROUTING_ERROR: Info(
        "retry",
        "A Microsoft Exchange server could not work out where to route the message.",
        f"{_RETRIED} If it persists, the Exchange administrators need to review their "
        "routing (connector) settings.",
    ),
    SMTPCode.MAILBOX_BUSY: Info(
        "retry",
        "The server did not take the message for now: the mailbox may be temporarily "
        "offline, or the server is holding back mail from your sending IP address.",
        f"{_RETRIED} If it repeats, check that your mail server's IP address has a clean "
        "reputation (not on a blocklist).",
        vague=True,
    ),
    SMTPCode.LOCAL_ERROR: Info(
        "retry",
        "The server ran into a problem of its own while handling the message -- usually a "
        "passing overload, sometimes a spam filter delaying an unfamiliar sender.",
        f"{_RETRIED} If it repeats over many attempts, ask your mail provider to check; "
        "free mailbox services often do this when used for large mailings.",
        vague=True,
    ),
    SMTPCode.INSUFFICIENT_STORAGE: Info(
        "retry",
        "The server is out of room for now: too many messages or recipients at once, or "
        "its storage is full.",
        f"{_RETRIED} The next attempt usually works; send in smaller batches if it recurs.",
        vague=True,
    ),
    SMTPCode.TEMPORARILY_UNAVAILABLE: Info(
        "retry",
        "The server cannot do this step right now -- typically encryption (TLS) is not "
        "available or the login check is failing on its side.",
        f"{_RETRIED} {_ASK_PROVIDER}",
    ),
    SMTPCode.PARAMETERS_UNAVAILABLE: Info(
        "retry",
        "The server cannot accept the options sent along with the sender or recipient "
        "address at the moment.",
        f"{_RETRIED} {_ASK_PROVIDER}",
    ),
    SMTPCode.LOCAL_SPAM_FILTER: Info(
        "retry",
        "Your mail server reported an internal error, frequently caused by its own spam filter.",
        f"{_RETRIED} If it continues, ask your mail provider to check the server's "
        "anti-spam filtering.",
    ),
    SMTPCode.UNRECOGNIZED_COMMAND: Info(
        "account",
        "Your mail server did not recognise a command. A firewall or antivirus that "
        "inspects mail traffic can garble the conversation this way.",
        "Check whether a firewall or security product scans mail traffic to your server "
        "and exclude it; otherwise ask your mail provider.",
    ),
    SMTPCode.SYNTAX_ERROR: Info(
        "account",
        "The server rejected what was sent with a command, most often because an email "
        "address is malformed.",
        "Check the sender and recipient addresses for typing mistakes or stray characters. "
        "If they look right, a security product inspecting mail traffic may be interfering.",
        stages={
            "mail": Info(
                "account",
                "Your mail server says the sender (From) address is not written correctly.",
                "Fix the From address in your settings: it must be a complete address such "
                "as name@yourdomain.com.",
            ),
            "rcpt": Info(
                "recipient",
                "The server says the recipient's address is not written correctly.",
                "Correct the recipient address (typing mistakes, spaces, a missing domain) "
                "and send again.",
            ),
        },
    ),
    SMTPCode.NOT_IMPLEMENTED: Info(
        "account",
        "Your mail server does not support a command it was sent.",
        "Ask your mail provider whether the feature (for example login or encryption) must "
        "be switched on, and check the port in your SMTP settings.",
    ),
    SMTPCode.BAD_SEQUENCE: Info(
        "account",
        "Your mail server received commands in an order it did not expect -- most often "
        "because it wants you to log in before sending.",
        "Make sure a username and password are set in your SMTP settings. If they are, the "
        "session may have been cut halfway; ask your mail provider if it persists.",
        vague=True,
    ),
    SMTPCode.PARAMETER_NOT_IMPLEMENTED: Info(
        "account",
        "Your mail server does not support an option used with a command, such as a login method.",
        "Ask your mail provider which options and ports they support, and adjust the "
        "security setting in your SMTP settings.",
    ),
    SMTPCode.BAD_ADDRESS: Info(
        "recipient",
        "The recipient's address is wrong: no such mailbox exists.",
        _CHECK_RECIPIENT,
    ),
    SMTPCode.NO_SUCH_MAILBOX: Info(
        "recipient",
        "The receiving server has no mailbox at this address.",
        _CHECK_RECIPIENT,
    ),
    SMTPCode.DOMAIN_NOT_FOUND: Info(
        "recipient",
        "The recipient's domain (the part after @) cannot be found in DNS, so there is "
        "nowhere to deliver to.",
        "Check the domain for typing mistakes, such as .con instead of .com, and correct "
        "the address.",
    ),
    SMTPCode.ADDRESS_TYPE_INCORRECT: Info(
        "recipient",
        "The server does not accept the address in the form given. Now and then this code "
        "really means the server wants you to log in.",
        "Check the recipient address. If it is correct, make sure your SMTP settings "
        "include a username and password.",
        vague=True,
    ),
    SMTPCode.NO_MAIL_ACCEPTED: Info(
        "recipient",
        "The recipient's server states that it does not accept email at all.",
        "Reach the recipient another way and ask for an address that receives mail.",
    ),
    SMTPCode.SIZE_EXCEEDED: Info(
        "message",
        "The message together with its recipient list is bigger than the receiving server allows.",
        "Send to the recipients in smaller groups, or make the message lighter, and send again.",
    ),
    SMTPCode.AUTH_REQUIRED: Info(
        "account",
        "Your mail server wants you to log in (or to switch on encryption) before it sends mail.",
        f"{_LOG_IN} Also check the encryption setting (STARTTLS or SSL/TLS).",
        vague=True,
    ),
    SMTPCode.AUTH_TOO_WEAK: Info(
        "account",
        "Your mail server refused the login method as not secure enough.",
        f"{_TURN_ON_TLS} Some providers also require allowing the sign-in method in their "
        "account security page.",
    ),
    SMTPCode.AUTH_FAILED: Info(
        "account",
        "Your mail server did not accept the username or password.",
        _LOG_IN,
    ),
    SMTPCode.ENCRYPTION_REQUIRED: Info(
        "account",
        "Your mail server only accepts this login method over an encrypted connection.",
        _TURN_ON_TLS,
    ),
    SMTPCode.REJECTED_AS_SPAM: Info(
        "recipient",
        "The recipient's server refused the message: a spam filter on their side decided "
        "against it.",
        "Ask the recipient to add your address or domain to their safe-senders list "
        "(allowlist), then send again.",
    ),
    SMTPCode.MAILBOX_UNAVAILABLE: Info(
        "recipient",
        "The server refused the recipient. Most of the time the address does not exist, "
        "although a firewall or a policy on the receiving side can answer the same way.",
        _CHECK_RECIPIENT,
        vague=True,
        stages={
            "data": Info(
                "account",
                "The server refused the message after receiving it, typically because of a "
                "spam or policy filter.",
                f"The server's own words usually name the reason. {_AUTHENTICATE_DOMAIN}",
                vague=True,
            ),
        },
    ),
    SMTPCode.USER_NOT_LOCAL: Info(
        "account",
        "Your mail server refused to pass the message on (relaying denied): it does not "
        "recognise you as a sender it may forward mail for.",
        f"{_LOG_IN} Also check that the From address belongs to a domain your server sends "
        "for; your provider may need to authorise you as a sender.",
    ),
    SMTPCode.STORAGE_EXCEEDED: Info(
        "message",
        "The message goes over a storage limit on the receiving side -- usually it is too "
        "big, because of its attachments.",
        _REDUCE_SIZE,
        vague=True,
        stages={
            "rcpt": Info(
                "recipient",
                "The recipient's mailbox has used up its storage allowance.",
                "Let the recipient know through another channel that their mailbox is "
                "full, and send again once they have made room.",
                # RFC 5321 4.5.3.1.10: some servers still say 552 for "too many recipients".
                vague=True,
            ),
        },
    ),
    SMTPCode.MAILBOX_NAME_INVALID: Info(
        "recipient",
        "The server rejected the recipient's mailbox name as invalid.",
        _CHECK_RECIPIENT,
        vague=True,
    ),
    SMTPCode.TRANSACTION_FAILED: Info(
        "account",
        "The server refused the mail for good -- usually because it judged it to be spam, "
        "or your mail server's IP address is on a blocklist.",
        f"{_CHECK_BLOCKLISTS} {_AUTHENTICATE_DOMAIN}",
        vague=True,
        stages={
            "rcpt": Info(
                "recipient",
                "The server permanently refused this recipient.",
                _CHECK_RECIPIENT,
                vague=True,
            ),
        },
    ),
    SMTPCode.PARAMETERS_NOT_RECOGNIZED: Info(
        "account",
        "Your mail server does not recognise an option sent along with the sender or "
        "recipient address, such as an address with non-Latin characters.",
        "Ask your mail provider whether their server supports that feature; plain ASCII "
        "addresses avoid the problem.",
    ),
    SMTPCode.DOMAIN_REFUSES_MAIL: Info(
        "recipient",
        "The recipient's domain states that it does not accept email.",
        "Reach the recipient another way and ask for an address that receives mail.",
    ),
}


# --- RFC 3463 enhanced status codes: class.subject.detail -----------------------------
# Texts are written to hold for both classes: a 4.x.x is always retried, a 5.x.x takes
# the verdict given here.

_UNKNOWN_PERMANENT = Info(
    "account",
    "The server refused the request without saying exactly why.",
    "The server's own message usually names the cause. If it is unclear, ask your mail provider.",
    vague=True,
    stages={
        "rcpt": Info(
            "recipient",
            "The server permanently refused this recipient without saying exactly why.",
            _CHECK_RECIPIENT,
            vague=True,
        ),
    },
)

ENHANCED_SUBJECTS: dict[int, Info] = {
    0: _UNKNOWN_PERMANENT,
    1: Info(
        "recipient",
        "Something is wrong with an address of the message.",
        _CHECK_RECIPIENT,
        vague=True,
    ),
    2: Info(
        "recipient",
        "Something is wrong with the recipient's mailbox.",
        "Contact the recipient another way to check that their mailbox is working.",
        vague=True,
    ),
    3: Info(
        "account",
        "The mail system that answered has a problem of its own.",
        _ASK_PROVIDER,
        vague=True,
    ),
    4: Info(
        "account",
        "A network or routing problem stopped delivery.",
        f"Ask your mail provider where the message got stuck. {_ASK_PROVIDER}",
        vague=True,
    ),
    5: Info(
        "account",
        "The mail servers did not understand each other (an SMTP conversation problem).",
        "Check the server, port and encryption in your SMTP settings; if they are right, ask "
        "your mail provider.",
        vague=True,
    ),
    6: Info(
        "message",
        "The content or format of the message was not accepted.",
        "Send a simpler version: ordinary text or HTML, without unusual attachments.",
        vague=True,
    ),
    7: Info(
        "account",
        "A security or policy rule refused the mail.",
        f"The server's own words name the rule. Make sure you log in to your mail server. "
        f"{_AUTHENTICATE_DOMAIN}",
        vague=True,
    ),
}

_MICROSOFT_BANNED_IP = Info(
    "account",
    "Microsoft's mail service has banned the IP address your mail server sends from.",
    "Ask for removal through Microsoft's delisting portal (sender.office.com) and find out "
    "why the address was flagged; your mail provider can help if it is their IP.",
)

_DETAIL_ENTRIES: dict[tuple[int, int], Info] = {
    (0, 0): _UNKNOWN_PERMANENT,
    # X.1 addressing
    (1, 0): ENHANCED_SUBJECTS[1],
    (1, 1): Info(
        "recipient",
        "There is no mailbox with this name at the recipient's domain.",
        _CHECK_RECIPIENT,
    ),
    (1, 2): Info(
        "recipient",
        "The recipient's domain (the part after @) does not exist or cannot take mail.",
        "Check the domain for typing mistakes and correct the address.",
    ),
    (1, 3): Info(
        "recipient",
        "The recipient's address is not written in a valid form.",
        "Correct the address -- look for spaces, missing parts or stray characters.",
    ),
    (1, 4): Info(
        "recipient",
        "The recipient's address matches more than one mailbox, so the server cannot tell "
        "which is meant.",
        "Ask the recipient for their full, exact address.",
    ),
    (1, 6): Info(
        "recipient",
        "The recipient's mailbox has moved and the server knows no forwarding address.",
        "Ask the recipient for their new address.",
    ),
    (1, 7): Info(
        "account",
        "Your sender (From) address is not written in a valid form.",
        "Correct the From address in your settings.",
    ),
    (1, 8): Info(
        "account",
        "The domain of your sender address is not valid or cannot receive replies.",
        "Make sure your domain has working DNS records (MX or A) and that the From address "
        "is spelled correctly.",
    ),
    (1, 10): Info(
        "recipient",
        "The recipient's domain publishes a 'null MX' record: it declares that it takes no "
        "email at all.",
        "This address cannot receive mail; ask the recipient for another one.",
    ),
    # X.2 mailbox
    (2, 0): ENHANCED_SUBJECTS[2],
    (2, 1): Info(
        "recipient",
        "The recipient's mailbox is disabled and not taking messages.",
        "The mailbox may be closed or suspended; contact the recipient another way.",
    ),
    (2, 2): Info(
        "recipient",
        "The recipient's mailbox is full.",
        "Tell the recipient through another channel that their mailbox is full, and send "
        "again once they have made room.",
    ),
    (2, 3): Info(
        "message",
        "The message is longer than the recipient's mailbox is set to accept.",
        _REDUCE_SIZE,
    ),
    (2, 4): Info(
        "recipient",
        "The address is a mailing list, and passing the message to its members failed.",
        "Let the list's owner know; the list may contain broken member addresses.",
    ),
    # X.3 mail system
    (3, 0): ENHANCED_SUBJECTS[3],
    (3, 1): Info(
        "account",
        "The mail system has run out of storage space.",
        f"This often clears on its own. {_ASK_PROVIDER}",
    ),
    (3, 2): Info(
        "account",
        "The mail system is not accepting messages at the moment, for example during "
        "maintenance or a shutdown.",
        _ASK_PROVIDER,
    ),
    (3, 3): Info(
        "message",
        "The message relies on a feature the receiving system cannot handle.",
        "Send a simpler version of the message.",
    ),
    (3, 4): Info(
        "message",
        "The message is bigger than the server accepts.",
        _REDUCE_SIZE,
    ),
    (3, 5): Info(
        "account",
        "The mail system is set up incorrectly.",
        "Ask your mail provider to check the server's configuration.",
    ),
    # X.4 network and routing
    (4, 0): ENHANCED_SUBJECTS[4],
    (4, 1): Info(
        "account",
        "The destination's mail server did not answer.",
        f"The destination may be down. {_ASK_PROVIDER}",
        stages={
            # Microsoft 365 answers "5.4.1 Recipient address rejected: Access denied"
            # for addresses that do not exist in the recipient's organisation.
            "rcpt": Info(
                "recipient",
                "The recipient's server refused this address; with Microsoft 365 this means "
                "the address does not exist there.",
                _CHECK_RECIPIENT,
            ),
        },
    ),
    (4, 2): Info(
        "account",
        "The connection to the destination broke.",
        _ASK_PROVIDER,
    ),
    (4, 3): Info(
        "account",
        "A directory or routing server failed, so the destination could not be worked out.",
        _ASK_PROVIDER,
    ),
    (4, 4): Info(
        "recipient",
        "There is no route to the recipient's domain: it has no working mail servers "
        "listed in DNS.",
        "Check the domain for typing mistakes. If it is right, the recipient's mail service "
        "is misconfigured; tell them another way.",
    ),
    (4, 5): Info(
        "account",
        "The mail system is congested, or you have hit a sending limit.",
        "Send more slowly or spread your mailings over time, and check your mail provider's "
        "sending limits.",
    ),
    (4, 6): Info(
        "message",
        "The message went through too many servers: it is caught in a forwarding loop.",
        "Check the forwarding rules on your side and ask the recipient to check theirs; "
        "sending it again unchanged will loop again.",
    ),
    (4, 7): Info(
        "account",
        "The message waited too long in a queue and the server gave up on it.",
        "The destination could not be reached for a long time. Ask your mail provider or "
        "the recipient whether their mail service is working.",
    ),
    # X.5 protocol
    (5, 0): ENHANCED_SUBJECTS[5],
    (5, 1): Info(
        "account",
        "The server did not recognise a command.",
        "Check the port and encryption in your SMTP settings; a security product that "
        "scans mail traffic can also cause this.",
    ),
    (5, 2): Info(
        "account",
        "The server found a syntax error in a command.",
        "Check the sender address in your settings. If it is right, ask your mail provider.",
        stages={
            "rcpt": Info(
                "recipient",
                "The server could not read the recipient's address: its syntax is invalid.",
                "Correct the recipient address and send again.",
            ),
        },
    ),
    (5, 3): Info(
        "message",
        "The message lists more recipients than the server accepts at once.",
        "Split the recipients over several messages.",
    ),
    (5, 4): Info(
        "account",
        "The server did not accept the details given with a command.",
        "Check the sender address and options in your settings; if they are right, ask your "
        "mail provider.",
        stages={
            "rcpt": Info(
                "recipient",
                "The server did not accept the recipient's address as written.",
                "Correct the recipient address and send again.",
            ),
        },
    ),
    (5, 5): Info(
        "account",
        "The servers disagree about which version of the protocol to use.",
        _ASK_PROVIDER,
    ),
    # X.6 content
    (6, 0): ENHANCED_SUBJECTS[6],
    (6, 1): Info(
        "message",
        "The message contains a kind of content the destination does not support.",
        "Send it as ordinary text or HTML, with common attachment types.",
    ),
    (6, 2): Info(
        "message",
        "The message would have to be converted to be delivered, and conversion is not allowed.",
        "Send it as ordinary text or HTML without special encodings.",
    ),
    (6, 3): Info(
        "message",
        "The message would need converting, and the server cannot do that conversion.",
        "Send it as ordinary text or HTML without special encodings.",
    ),
    (6, 7): Info(
        "recipient",
        "The address contains non-Latin characters, which the receiving server does not support.",
        "Ask the recipient for a plain ASCII address, if they have one.",
    ),
    # X.7 security and policy
    (7, 0): ENHANCED_SUBJECTS[7],
    (7, 1): Info(
        "account",
        "The server is not allowing this delivery: a policy refused it -- for example "
        "relaying without login, a blocklisted IP, or failed sender checks.",
        "The server's own words name the rule. Common fixes: log in to your mail server, "
        "check your IP address against blocklists, and set up SPF, DKIM and DMARC.",
        vague=True,
    ),
    (7, 2): Info(
        "recipient",
        "You are not allowed to send to this mailing list.",
        "Ask the list's owner to allow your address.",
    ),
    (7, 3): Info(
        "message",
        "The message needs a security conversion the server cannot perform.",
        "Send the message without encryption or signing, if that is acceptable.",
        # Microsoft sends "535 5.7.3 Authentication unsuccessful": let the basic code speak.
        vague=True,
    ),
    (7, 4): Info(
        "account",
        "A security feature that was requested is not supported by the server.",
        "Check the encryption setting in your SMTP settings, or ask your mail provider.",
    ),
    (7, 5): Info(
        "message",
        "A cryptographic operation on the message (decrypting or checking a signature) failed.",
        "Send the message without encryption or signing, or check your signing setup.",
    ),
    (7, 6): Info(
        "message",
        "The message is encrypted or signed with an algorithm the server does not support.",
        "Use a common algorithm, or send the message without encryption or signing.",
    ),
    (7, 7): Info(
        "message",
        "The message failed an integrity check; it may have been altered on the way.",
        "Send the message again; if it keeps failing, check any signing on your side.",
    ),
    (7, 8): Info(
        "account",
        "Login to your mail server failed: the username or password was not accepted.",
        _LOG_IN,
    ),
    (7, 9): Info(
        "account",
        "Your mail server considers the login method too weak.",
        _TURN_ON_TLS,
    ),
    (7, 10): Info(
        "account",
        "Your mail server requires an encrypted connection for this.",
        _TURN_ON_TLS,
    ),
    (7, 11): Info(
        "account",
        "This login method needs an encrypted connection.",
        _TURN_ON_TLS,
    ),
    (7, 12): Info(
        "account",
        "Your mail server wants the password to be changed before it accepts it again.",
        "Sign in to your mail provider's website, set a new password, and enter it in your "
        "SMTP settings.",
    ),
    (7, 13): Info(
        "account",
        "Your account on the mail server is disabled.",
        "Ask your mail provider to reactivate it.",
    ),
    (7, 14): Info(
        "account",
        "The server only takes mail from servers it has an agreed trust arrangement with.",
        "Ask your mail provider which connector or authorisation is needed.",
    ),
    (7, 17): Info(
        "recipient",
        "The mailbox now belongs to someone else than when the address was given out.",
        "Confirm the address with the recipient another way.",
    ),
    (7, 18): Info(
        "recipient",
        "The recipient's domain has changed owner since the address was given out.",
        "Confirm the address with the recipient another way.",
    ),
    (7, 20): Info(
        "account",
        "The message carries no DKIM signature the server accepts.",
        _AUTHENTICATE_DOMAIN,
    ),
    (7, 21): Info(
        "account",
        "The message's DKIM signature was not acceptable to the server.",
        _AUTHENTICATE_DOMAIN,
    ),
    (7, 22): Info(
        "account",
        "The message has no valid DKIM signature from the domain in its From address.",
        _AUTHENTICATE_DOMAIN,
    ),
    (7, 23): Info(
        "account",
        "The SPF check failed: your domain's SPF record does not list the server that sent "
        "for you.",
        "Add your mail server (or your provider's include: entry) to the SPF record in your "
        "domain's DNS.",
    ),
    (7, 24): Info(
        "account",
        "The SPF check hit an error: your domain's SPF record is probably broken.",
        "Check the SPF record with an online validator and fix syntax errors or too many lookups.",
    ),
    (7, 25): Info(
        "account",
        "The reverse DNS check failed: your mail server's IP address has no matching host "
        "name (PTR record).",
        "Ask whoever controls the IP address (your host or ISP) to set a PTR record that "
        "matches the server's name.",
    ),
    (7, 26): Info(
        "account",
        "The message failed several sender checks at once -- typically SPF and DKIM both "
        "failed, so DMARC failed too.",
        _AUTHENTICATE_DOMAIN,
    ),
    (7, 27): Info(
        "account",
        "Your sender domain publishes a 'null MX' record saying it takes no email, so "
        "servers refuse mail from it.",
        "Send from a domain that can receive mail, or remove the null MX record.",
    ),
    # Microsoft 365 / Exchange Online specifics
    (7, 57): Info(
        "account",
        "Your mail server requires you to log in; sending without login is not allowed.",
        _LOG_IN,
    ),
    (7, 139): Info(
        "account",
        "Login by SMTP (SMTP AUTH) is switched off for your Microsoft 365 organisation or mailbox.",
        "In the Microsoft 365 admin centre, turn on Authenticated SMTP for the sending "
        "mailbox, or ask your administrator to.",
    ),
    (7, 64): Info(
        "account",
        "Microsoft 365 refused to relay the message for your organisation.",
        "Check the connector settings in your Microsoft 365 admin centre, or log in with a "
        "mailbox of your organisation.",
    ),
    (7, 708): Info(
        "account",
        "Microsoft's mail service refuses traffic from your sending IP because of its reputation.",
        _CHECK_BLOCKLISTS,
    ),
}

ENHANCED_DETAILS: dict[tuple[int, int], Info] = {
    **_DETAIL_ENTRIES,
    # Microsoft reports a banned sending IP with any detail from 606 to 649.
    **{(7, detail): _MICROSOFT_BANNED_IP for detail in range(606, 650)},
}


# --- Below SMTP: no reply code was received -------------------------------------------

CONNECTION: dict[str, Info] = {
    # No reply code, but the server lacks something the account's settings need (AUTH
    # not offered, no PLAIN/LOGIN mechanism, no SMTPUTF8 for a non-ASCII address).
    "unsupported": Info(
        "account",
        "Your mail server does not offer something these settings need, such as a login "
        "method Outbox can use, or international (non-ASCII) addresses.",
        "Check the host and port in your SMTP settings: a submission port (587 with STARTTLS, "
        "or 465 with TLS) normally offers login. If the server really cannot log in, remove "
        "the username; for non-ASCII addresses, ask your provider for SMTPUTF8 support.",
    ),
    "refused": Info(
        "account",
        "Your mail server refused the connection: nothing is accepting mail at that host "
        "and port, or a firewall turns it away.",
        "Check the host name and port in your SMTP settings (usually 587, or 465 for SSL) "
        "and that the server accepts connections from the internet.",
    ),
    "unreachable": Info(
        "account",
        "Your mail server could not be reached over the network.",
        "Check the spelling of the host name and the port in your SMTP settings; if both "
        "are right, the server or its network may be down -- ask your mail provider.",
    ),
    "dns": Info(
        "account",
        "The host name of your mail server does not exist in DNS.",
        "Correct the server name in your SMTP settings (for example smtp.yourprovider.com).",
    ),
    "timeout": Info(
        "retry",
        "Your mail server did not answer in time.",
        f"{_RETRIED} If every attempt times out, check the port and any firewall in front "
        "of your server.",
    ),
    "tls": Info(
        "account",
        "An encrypted (TLS) connection to your mail server could not be set up.",
        "Check the encryption setting: port 465 uses SSL/TLS from the start, port 587 uses "
        "STARTTLS. A mismatch between port and setting causes this.",
    ),
    "certificate": Info(
        "account",
        "Your mail server's security certificate is not trusted, has expired, or was "
        "issued for a different name.",
        "Use the exact host name shown on the server's certificate, or ask your mail "
        "provider to renew or fix it.",
    ),
    "dropped": Info(
        "retry",
        "Your mail server closed the connection unexpectedly.",
        f"{_RETRIED} If it happens every time, the server may be overloaded or blocking "
        "this traffic; ask your mail provider.",
    ),
}

#: How each connection failure is worded: by the operating system and Python's socket,
#: ssl and smtplib modules (what the engine meets as exceptions, worker.smtp), and by
#: the engine itself in the replies it records (what logs, `outbox show` and notices
#: print). One table for both sides: the engine classifies an exception by it, and
#: `outbox explain` a pasted text, so they always agree. Rows in order, the first that
#: matches wins: (failure, errno values, patterns, case-insensitive). Errno values use
#: Linux numbering (as the seed table and the hosts Outbox runs on); getaddrinfo's are
#: negative.
CONNECTION_SIGNS: tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...] = (
    (
        "certificate",
        (),
        (
            r"CERTIFICATE_VERIFY_FAILED",
            r"certificate verify failed",
            r"presented a certificate that is not trusted",
            r"CA certificate \(PEM\) could not be loaded",
        ),
    ),
    (
        "tls",
        (),
        (
            r"\[SSL(?::\s*\w+)?\]",  # ssl.SSLError: "[SSL: WRONG_VERSION_NUMBER] ..."
            r"\bTLS with \S+ failed",
            r"does not offer STARTTLS",
            r"STARTTLS extension not supported",
            r"TLS/SSL connection has been closed",
        ),
    ),
    (
        "dns",
        # EAI_NONAME, EAI_AGAIN, EAI_FAIL, EAI_NODATA, EAI_SERVICE, EAI_ADDRFAMILY
        (-2, -3, -4, -5, -8, -9),
        (
            r"Name or service not known",
            r"nodename nor servname provided",
            r"Temporary failure in name resolution",
            r"No address associated with hostname",
            r"Non-recoverable failure in name resolution",
            r"getaddrinfo failed",
            r"\bdoes not resolve\b",
        ),
    ),
    (
        "refused",
        (111,),  # ECONNREFUSED
        (r"Connection refused", r"refused the connection", r"actively refused"),
    ),
    (
        "unreachable",
        (100, 101, 112, 113),  # ENETDOWN, ENETUNREACH, EHOSTDOWN, EHOSTUNREACH
        (
            r"Network is unreachable",
            r"No route to host",
            r"Network is down",
            r"Host is down",
            r"\bis unreachable\b",
        ),
    ),
    (
        "timeout",
        (110,),  # ETIMEDOUT
        (r"\btimed out\b", r"did not answer within"),
    ),
    (
        "dropped",
        (32, 103, 104),  # EPIPE, ECONNABORTED, ECONNRESET
        (
            r"Connection reset by peer",
            r"Broken pipe",
            r"Connection unexpectedly closed",
            r"closed the connection unexpectedly",
            r"Connection aborted",
            r"forcibly closed",
        ),
    ),
    (
        "unsupported",
        (),
        (
            r"does not offer AUTH",
            r"no AUTH mechanism in common",
            r"does not offer SMTPUTF8",
        ),
    ),
)

#: Errno values that show up where a reply code is expected (the seed table lists 101
#: and 111 as if they were SMTP codes), or as ``[Errno N]`` in a text.
ERRNO_FAILURES: dict[int, str] = {
    number: failure for failure, numbers, _ in CONNECTION_SIGNS for number in numbers
}


# --- Fallbacks when nothing more specific is known ------------------------------------

UNKNOWN_CONNECTION = Info(
    "retry",
    "The connection to your mail server failed before it gave any reply.",
    f"{_RETRIED} If it keeps failing, check the host name, port and encryption in your "
    "SMTP settings.",
)
UNKNOWN_OK = Info("ok", "The server accepted the request.", _NOTHING_TO_DO)
UNKNOWN_TRANSIENT = Info(
    "retry",
    "The server reported a temporary problem.",
    f"{_RETRIED} {_ASK_PROVIDER}",
    vague=True,
)
UNKNOWN_PERMANENT = _UNKNOWN_PERMANENT

#: Verdicts that cannot be right at a stage: before any recipient is named (connect,
#: login, MAIL FROM) a refusal is not about a recipient, and before MAIL FROM (which may
#: declare the message size) it is not about the message either.
IMPOSSIBLE_AT: dict[StageName, frozenset[VerdictName]] = {
    "connect": frozenset({"recipient", "message"}),
    "auth": frozenset({"recipient", "message"}),
    "mail": frozenset({"recipient"}),
}

#: What replaces an entry whose verdict is impossible at its stage.
SENDER_SIDE: dict[StageName, Info] = {
    "connect": Info(
        "account",
        "Your mail server refused the session before any recipient was named, so the "
        "problem lies with your account or its connection.",
        "Read the server's own words for the reason, check your SMTP settings, and check "
        "that your sending IP address is not blocked.",
    ),
    "auth": Info(
        "account",
        "Your mail server refused the login.",
        "Check the username and password in your SMTP settings and that the account is "
        "active with your mail provider.",
    ),
    "mail": _SENDER_REJECTED,
}


# --- Hints read off the server's text --------------------------------------------------
# Consulted in order (the first match wins) when the code alone is vague. Patterns are
# case-insensitive regular expressions.

HINTS: tuple[tuple[str, Info], ...] = (
    (
        r"\bspf\b|\bdkim\b|\bdmarc\b|reverse\s+(dns|host\s*name|lookup)|\bptr\b|\brdns\b"
        r"|\bhelo\b|\behlo\b",
        Info(
            "account",
            "Checks on your sending domain or server identity failed (SPF, DKIM, DMARC, "
            "reverse DNS, or the name your server introduces itself with).",
            f"{_AUTHENTICATE_DOMAIN} Your server's IP address also needs a reverse DNS name.",
        ),
    ),
    (
        r"relay(ing)?\s+(access\s+)?(is\s+)?(denied|not\s+(permitted|allowed)|prohibited|refused)"
        r"|(unable|not\s+permitted|not\s+allowed)\s+to\s+relay|we\s+do\s+not\s+relay",
        Info(
            "account",
            "Your mail server refused to pass the message on (relaying denied): it did not "
            "accept you as a sender it may forward mail for.",
            f"{_LOG_IN} Also check that the From address belongs to a domain your server "
            "sends for.",
        ),
    ),
    (
        r"starttls|\btls\b.{0,40}\b(required|first)|must\s+use\s+(tls|ssl)"
        r"|encryption\s+(is\s+)?required",
        Info(
            "account",
            "Your mail server requires an encrypted connection before it accepts mail.",
            _TURN_ON_TLS,
        ),
    ),
    (
        r"authenticat|\bauth\b|log\s*in\s+(required|failed)|credentials|password",
        Info(
            "account",
            "Your mail server wants you to log in, or did not accept the login.",
            _LOG_IN,
        ),
    ),
    (
        r"spamhaus|spamcop|barracuda|sorbs|\bs?rbl\b|dnsbl|block\s*-?list|black\s*-?list"
        r"|\bblocked\b|(?<!not )\blisted\b|\bbanned\b|reputation",
        Info(
            "account",
            "Your mail server's IP address or your domain is on a blocklist, so the server "
            "refuses its mail.",
            _CHECK_BLOCKLISTS,
        ),
    ),
    (
        r"\bspam\b|\bjunk\b|unsolicited",
        Info(
            "account",
            "The server classified the mail as spam.",
            f"{_AUTHENTICATE_DOMAIN} Avoid spam-like wording and ask regular recipients to "
            "add you to their safe-senders list.",
        ),
    ),
    (
        r"gr[ae]y\s*-?list|try\s+again\s+later|retry\s+later|temporarily\s+(deferred|rejected)",
        Info(
            "retry",
            "The server is deliberately delaying mail from a sender it has not seen before "
            "(greylisting); a later attempt normally gets through.",
            "Nothing to do: the automatic retry takes care of it.",
        ),
    ),
    (
        r"too\s+many\s+(connections|messages|mails|emails|sessions)|\brate\b|throttl"
        r"|too\s+fast|slow\s+down|sending\s+(limit|quota)|daily\s+limit",
        Info(
            "retry",
            "You are sending more, or faster, than the server allows (a rate or connection limit).",
            f"{_RETRIED} If it happens often, check your mail provider's sending limits and "
            "spread your mailings over time.",
        ),
    ),
    (
        # RFC 5321 4.5.3.1.10: "too many recipients" is temporary even under code 552.
        r"too\s+many\s+recipients|recipient\s+limit|maximum\s+(number\s+of\s+)?recipients",
        Info(
            "retry",
            "The message has more recipients than the server accepts in one go.",
            f"{_RETRIED} If it keeps failing, send to fewer recipients per message.",
        ),
    ),
    (
        r"mailbox\s+(is\s+)?full|over\s*quota|quota\s+exceeded|exceeded\s+(its|the)\s+quota"
        r"|mailbox\s+size\s+limit",
        Info(
            "recipient",
            "The recipient's mailbox is full.",
            "Tell the recipient through another channel that their mailbox is full, and "
            "send again once they have made room.",
        ),
    ),
    (
        r"too\s+(large|big)|size\s+(limit|exceeded)|exceeds?\s+.{0,30}size|message\s+size",
        Info("message", "The message is too large for the server.", _REDUCE_SIZE),
    ),
    (
        r"virus|malware|infected|attachment|content\s+(rejected|policy)",
        Info(
            "message",
            "The server refused what the message contains -- for example a blocked "
            "attachment type or suspected malware.",
            "Remove or replace the attachment (zip files and programs are often blocked), "
            "or share it as a link, then send again.",
        ),
    ),
    (
        r"user\s+unknown|unknown\s+(user|recipient|mailbox|address)"
        r"|no\s+such\s+(user|mailbox|recipient|address)|does\s*n[o']t\s+exist|not\s+exist"
        r"|mailbox\s+(unavailable|not\s+found|not\s+available)|recipient\s+(not\s+found|unknown)"
        r"|invalid\s+(recipient|mailbox)|user\s+not\s+found",
        Info(
            "recipient",
            "The recipient's address does not exist on the receiving server.",
            _CHECK_RECIPIENT,
        ),
    ),
    (
        r"disabled|inactive|suspended|deactivated|no\s+longer\s+(active|in\s+use|available)",
        Info(
            "recipient",
            "The recipient's mailbox is disabled or no longer in use.",
            "Contact the recipient another way and ask for a current address.",
        ),
    ),
    (
        r"domain\s+(not\s+found|does\s+not\s+exist|unknown)|host\s+(not\s+found|unknown)"
        r"|unroutable|unrouteable|no\s+mx\b|nxdomain",
        Info(
            "recipient",
            "The recipient's domain could not be found, or has no mail servers.",
            "Check the part after @ for typing mistakes and correct the address.",
        ),
    ),
)
