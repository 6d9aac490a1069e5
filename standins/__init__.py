"""Stand-ins for the world outside Outbox, shared by the tests, `make demo` and `make bench`.

`smtp`: an SMTP server on port 0, scripted per recipient, that records what it got.
`provider`: a backup provider's HTTP API (SendGrid, Postmark, Mailgun shapes).
`services`: throwaway PostgreSQL databases, Redis dbs and real Outbox worker processes.

None of this is part of the product (it is not packaged); it lives outside `tests/` so
the tools need not import the test suite.
"""
