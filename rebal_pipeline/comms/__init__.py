"""Communication with people and systems outside rebal: emails (advisor alert, reminder,
escalation, weekly digest, client confirmation), the drift chart they carry, SMTP delivery and
CRM notes/tasks (Wealthbox-style and Redtail-style).

Pure rendering lives in `emails.py` and `chart.py` (no I/O); `smtp.py` and `crm.py` talk to the
network. Exactly-once is the caller's job, made possible here by deterministic identities: a
Message-ID derived from an idempotency key (`smtp.make_message_id`) and an `Idempotency-Key`
header derived from the caller's key on every CRM call. No client PII and no secret is logged.
"""
