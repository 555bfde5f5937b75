"""The deterministic keys every message is delivered under (comms/outbound.py `deliver`).

A key names what is owed, never when: a re-run, a retry or two ticks asking for the same thing
compute the same key, so a `sent` key is never sent again. Changing a key's shape re-sends
everything already sent under the old one.
"""

from rebal_pipeline.core.pii import mask_account


def alert_key(recommendation_id: str, advisor_id: str | None) -> str:
    return f"alert:{recommendation_id}:{advisor_id or '-'}"


def crm_task_key(recommendation_id: str) -> str:
    return f"crm_task:{recommendation_id}"


def confirmation_key(decision_id: str, account_id: str) -> str:
    return f"confirmation:{decision_id}:{account_id}"


def crm_note_key(decision_id: str) -> str:
    return f"crm_note:{decision_id}"


def key_for_people(key: str) -> str:
    """A message key as logs and run metadata show it: a confirmation's account number masked to
    its last four characters (core/pii.py); the store keeps the key whole."""
    kind, _, rest = key.partition(":")
    decision, sep, account = rest.rpartition(":")
    return f"{kind}:{decision}:{mask_account(account)}" if kind == "confirmation" and sep else key
