"""The custodian secrets a connection names: the one place they are read.

connections.yaml never holds a secret: it names the environment variables that do (an SFTP key
file's path or the key itself, its passphrase, an OAuth client id and secret; see
connections/config.py). Those names are chosen per deployment, so they cannot be fields of
`settings.RebalSettings`; they are looked up here, by name, when a connection is used. Values are
never logged or put in an error message: callers name the variable, not its value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def custodian_secret(variable: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the environment variable `variable` (as set, empty included), None when unset.
    `environ` replaces the process environment (tests)."""
    return (os.environ if environ is None else environ).get(variable)
