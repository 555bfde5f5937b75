"""Sending what the workflow owes people and systems (issue #6): the advisor's alert and CRM task,
reminders / escalations / weekly digests from the approval outbox, and after execution the client
confirmation and the CRM note — each exactly once per key through `comms.outbound`, with retries
for peers that are down.
"""
