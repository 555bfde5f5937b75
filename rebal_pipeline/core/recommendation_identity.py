"""Recommendation identity: the one place a recommendation id is minted, from the final trades.

The contract. A recommendation's id is the first 32 hex digits of the SHA-256 of one canonical
text, and that text is a function of exactly:
- as_of, the session the recommendation is for;
- kind (rebalance | harvest), scope (account | household) and scope_id;
- the policy version;
- the model version each member account's proposal was built from (an account-scope
  recommendation's member is its account, a household's are its sized member accounts; a
  harvest is built from lots, not from a model, and records none, written empty);
- the FINAL trades, after the tax engine (wash-sale substitutes in, harvests as their own
  recommendations): account, symbol, side and quantity, the quantity in integer units of 1e-8
  share written with 8 fixed decimals (`QUANTITY_DECIMALS`).

Invariants (rebal_pipeline_tests/trades/test_recommendation_identity.py):
- the same inputs in any row order give the same ids: members and trades are sorted before
  they are written;
- a re-run of a day gives the same ids, so it creates no duplicate recommendation;
- a corrected feed that changes a trade (its quantity, symbol, side or account; a buy replaced
  by its wash-sale substitute) gives a new id, and so does a different model version of any
  member account;
- the harvest and the rebalance of one account on one day have different ids (kind is written);
- two different inputs never share a text: `%` `,` `:` `;` `=` inside a value are written
  %25 %2C %3A %3B %3D, so no value can pose as a separator.

Before minting, the pipeline keys each recommendation by its provisional key (`KEY`,
`kind|scope|scope_id`, unique within a day: `provisional_key`): the proposal orchestration
(core/proposals.py) keys the sized proposals by it, and every step of the tax engine (lot relief,
wash-sale matching, harvests, the summary) works on it. The orchestration mints the ids once, at
its end, with `mint_recommendation_ids`, and every frame it writes then carries the minted id in
place of the key (`with_recommendation_ids`).

The text (one line, wrapped here):

    as_of=<YYYY-MM-DD>;kind=<kind>;scope=<scope>;scope_id=<id>;policy_version=<v>;
    models=<account_id>:<model_version>,...;trades=<account_id>:<symbol>:<side>:<quantity>,...

models sorted by account_id, trades by (account_id, symbol, side, quantity). Pure polars and
hashlib: the texts are built vectorised and SHA-256 runs once per recommendation on its one
string, which is not the hot path. `canonical_text` and `recommendation_id` are the scalar twins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import date

import polars as pl

# The provisional key's column: what a recommendation is called until its id is minted.
KEY = "recommendation_key"
ID = "recommendation_id"
# Quantities are written with this many decimals: the feed carries at most 8, and sizing never
# rounds to more (trade_sizing.SizingPolicy), so two different quantities never share a text.
QUANTITY_DECIMALS = 8
_UNIT = 10**QUANTITY_DECIMALS
# Percent first, so an escape sequence is never escaped again.
_ESCAPES = (("%", "%25"), (",", "%2C"), (":", "%3A"), (";", "%3B"), ("=", "%3D"))


def provisional_key(kind: str | pl.Expr, scope: str | pl.Expr, scope_id: str | pl.Expr) -> pl.Expr:
    """`kind|scope|scope_id`: unique within a day (one rebalance per alerted scope, one harvest
    per account), and never ambiguous, since kind and scope are fixed words."""
    parts = [pl.lit(p) if isinstance(p, str) else p for p in (kind, scope, scope_id)]
    return pl.concat_str(parts, separator="|")


def _escaped(value: pl.Expr) -> pl.Expr:
    for raw, written in _ESCAPES:
        value = value.str.replace_all(raw, written, literal=True)
    return value


def _escaped_py(value: str | None) -> str:
    value = value or ""
    for raw, written in _ESCAPES:
        value = value.replace(raw, written)
    return value


def _quantity_text(quantity: pl.Expr) -> pl.Expr:
    # Integer units rendered by hand: float-to-text casting is not promised stable across polars
    # versions, integer-to-text is.
    units = (quantity * _UNIT).round(0).cast(pl.Int64)
    return pl.concat_str(
        (units // _UNIT).cast(pl.String), pl.lit("."), (units % _UNIT).cast(pl.String).str.zfill(QUANTITY_DECIMALS)
    )


def _quantity_text_py(quantity: float) -> str:
    whole, frac = divmod(int(round(quantity * _UNIT)), _UNIT)
    return f"{whole}.{frac:0{QUANTITY_DECIMALS}d}"


def canonical_texts(recommendations: pl.DataFrame, members: pl.DataFrame, trades: pl.DataFrame,
                    as_of: date, policy_version: str) -> pl.DataFrame:
    """KEY → text (see the module docstring) for every recommendation given.

    recommendations: KEY, kind, scope, scope_id (one row per recommendation). members: KEY,
    account_id, model_version (null: none recorded). trades: KEY, account_id, symbol, side,
    quantity (the final trades). A recommendation without members or trades still gets a text."""
    recs = recommendations.select(KEY, "kind", "scope", "scope_id")
    if recs[KEY].is_null().any() or recs[KEY].is_duplicated().any():
        raise ValueError(f"recommendations: {KEY} must be present and unique")
    models = (
        members.select(KEY, "account_id", "model_version")
        .sort(KEY, "account_id", "model_version", nulls_last=True)
        .group_by(KEY, maintain_order=True)
        .agg(pl.concat_str(_escaped(pl.col("account_id")), _escaped(pl.col("model_version").fill_null("")),
                           separator=":").str.join(",").alias("_models"))
    )
    lines = (
        trades.select(KEY, "account_id", "symbol", "side", "quantity")
        .sort(KEY, "account_id", "symbol", "side", "quantity")
        .group_by(KEY, maintain_order=True)
        .agg(pl.concat_str(_escaped(pl.col("account_id")), _escaped(pl.col("symbol")), _escaped(pl.col("side")),
                           _quantity_text(pl.col("quantity")), separator=":").str.join(",").alias("_trades"))
    )
    return recs.join(models, on=KEY, how="left").join(lines, on=KEY, how="left").select(
        KEY,
        pl.concat_str(
            pl.lit(f"as_of={as_of.isoformat()};kind="), _escaped(pl.col("kind")),
            pl.lit(";scope="), _escaped(pl.col("scope")),
            pl.lit(";scope_id="), _escaped(pl.col("scope_id")),
            pl.lit(f";policy_version={_escaped_py(policy_version)};models="), pl.col("_models").fill_null(""),
            pl.lit(";trades="), pl.col("_trades").fill_null(""),
        ).alias("text"),
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def mint_recommendation_ids(recommendations: pl.DataFrame, members: pl.DataFrame, trades: pl.DataFrame,
                            as_of: date, policy_version: str) -> pl.DataFrame:
    """KEY → recommendation_id, one row per recommendation (the inputs of `canonical_texts`)."""
    texts = canonical_texts(recommendations, members, trades, as_of, policy_version).sort(KEY)
    return texts.select(KEY, pl.Series(ID, [_digest(t) for t in texts["text"].to_list()], dtype=pl.String))


def with_recommendation_ids(frame: pl.DataFrame, ids: pl.DataFrame) -> pl.DataFrame:
    """The frame with its KEY column replaced, in place, by the minted recommendation_id (ids
    from `mint_recommendation_ids`). A null key stays null (e.g. a harvest candidate not
    proposed); a key that was not minted is an error, never a silent null."""
    return frame.with_columns(pl.col(KEY).replace_strict(ids[KEY], ids[ID], return_dtype=pl.String)).rename({KEY: ID})


def canonical_text(as_of: date, kind: str, scope: str, scope_id: str, policy_version: str,
                   models: Mapping[str, str | None], trades: Iterable[tuple[str, str, str, float]]) -> str:
    """The scalar twin of `canonical_texts` for one recommendation: models is account_id →
    model_version, trades (account_id, symbol, side, quantity)."""
    model_text = ",".join(f"{_escaped_py(a)}:{_escaped_py(v)}" for a, v in sorted(models.items()))
    trade_text = ",".join(
        f"{_escaped_py(a)}:{_escaped_py(s)}:{_escaped_py(side)}:{_quantity_text_py(q)}"
        for a, s, side, q in sorted(trades)
    )
    return (f"as_of={as_of.isoformat()};kind={_escaped_py(kind)};scope={_escaped_py(scope)};"
            f"scope_id={_escaped_py(scope_id)};policy_version={_escaped_py(policy_version)};"
            f"models={model_text};trades={trade_text}")


def recommendation_id(as_of: date, kind: str, scope: str, scope_id: str, policy_version: str,
                      models: Mapping[str, str | None], trades: Iterable[tuple[str, str, str, float]]) -> str:
    """sha256 hex (first 32) of `canonical_text`: the scalar twin of `mint_recommendation_ids`."""
    return _digest(canonical_text(as_of, kind, scope, scope_id, policy_version, models, trades))
