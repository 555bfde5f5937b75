"""The recommendation id (core/recommendation_identity.py): minted once, from the final trades.

The sized books come from test_trade_sizing.py; the ids are minted from their trades as the
proposal orchestration mints them (after the tax engine)."""

from __future__ import annotations

from datetime import date

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rebal_pipeline.core.recommendation_identity import (
    ID, KEY, canonical_text, canonical_texts, mint_recommendation_ids, provisional_key, recommendation_id,
    with_recommendation_ids,
)
from rebal_pipeline.core.trade_sizing import SizingPolicy, size_trades
from rebal_pipeline_tests.trades.test_trade_sizing import M6040, SMALL, TOPUP_ETFS, M_SPLIT, Book, _mixed_book

AS_OF = date(2026, 11, 20)
POLICY = "2026.11-2+abc"
TRADE_SCHEMA = {KEY: pl.String, "account_id": pl.String, "symbol": pl.String, "side": pl.String,
                "quantity": pl.Float64}
MEMBER_SCHEMA = {KEY: pl.String, "account_id": pl.String, "model_version": pl.String}


def account_rebalances(sized_accounts: pl.DataFrame, model_version: str = "M6040@abc123"):
    """One account-scope rebalance per sized account: (recommendations, members)."""
    recs = sized_accounts.select(
        provisional_key("rebalance", "account", pl.col("account_id")).alias(KEY),
        pl.lit("rebalance").alias("kind"), pl.lit("account").alias("scope"), pl.col("account_id").alias("scope_id"),
    )
    members = recs.select(KEY, pl.col("scope_id").alias("account_id"), pl.lit(model_version).alias("model_version"))
    return recs, members


def keyed(trades: pl.DataFrame, kind: str = "rebalance") -> pl.DataFrame:
    return trades.with_columns(provisional_key(kind, "account", pl.col("account_id")).alias(KEY))


def the_slow_way(recs: pl.DataFrame, members: pl.DataFrame, trades: pl.DataFrame) -> dict[str, str]:
    """Each id from the scalar twin, one recommendation at a time."""
    out = {}
    for rec in recs.iter_rows(named=True):
        m = members.filter(pl.col(KEY) == rec[KEY])
        t = trades.filter(pl.col(KEY) == rec[KEY])
        out[rec[KEY]] = recommendation_id(
            AS_OF, rec["kind"], rec["scope"], rec["scope_id"], POLICY,
            dict(zip(m["account_id"], m["model_version"])),
            list(zip(t["account_id"], t["symbol"], t["side"], t["quantity"])),
        )
    return out


def mint(recs, members, trades, as_of=AS_OF, policy=POLICY) -> dict[str, str]:
    return dict(mint_recommendation_ids(recs, members, trades, as_of, policy).iter_rows())


def one(trades, *, kind="rebalance", scope="account", scope_id="A1", models=None, as_of=AS_OF, policy=POLICY) -> str:
    """The minted id of one recommendation with these (account_id, symbol, side, quantity) trades."""
    key = f"{kind}|{scope}|{scope_id}"
    recs = pl.DataFrame({KEY: [key], "kind": [kind], "scope": [scope], "scope_id": [scope_id]})
    models = {scope_id: "m@1"} if models is None else models
    members = pl.DataFrame({KEY: [key] * len(models), "account_id": list(models),
                            "model_version": list(models.values())}, schema=MEMBER_SCHEMA)
    frame = pl.DataFrame([(key, *t) for t in trades], schema=TRADE_SCHEMA, orient="row")
    return mint(recs, members, frame, as_of, policy)[key]


# ---------------------------------------------------------------------------------------------
# The contract: the documented text, hashed
# ---------------------------------------------------------------------------------------------


def test_the_sizing_cores_trades_get_the_documented_sha256_of_the_canonical_text():
    frames = _mixed_book().frames()
    sized = size_trades(**frames, policy=SizingPolicy())
    recs, members = account_rebalances(sized.accounts)
    trades = keyed(sized.trades)
    ids = mint(recs, members, trades)
    assert trades.height > 0 and set(ids) == set(recs[KEY])
    # The id is the documented sha256 of the canonical text, computed here the slow way.
    assert ids == the_slow_way(recs, members, trades)
    assert all(len(i) == 32 for i in ids.values()) and len(set(ids.values())) == len(ids)
    assert canonical_text(AS_OF, "rebalance", "account", "A1", "P1", {"A1": "model:M6040@abc"},
                          [("A1", "VTI", "sell", 100.0), ("A1", "BND", "buy", 200.0)]) == (
        "as_of=2026-11-20;kind=rebalance;scope=account;scope_id=A1;policy_version=P1;models=A1:model%3AM6040@abc;"
        "trades=A1:BND:buy:200.00000000,A1:VTI:sell:100.00000000"
    )
    texts = canonical_texts(recs, members, trades, AS_OF, POLICY)
    assert texts.filter(pl.col(KEY) == "rebalance|account|A1")["text"].item().startswith(
        f"as_of=2026-11-20;kind=rebalance;scope=account;scope_id=A1;policy_version={POLICY};"
        "models=A1:M6040@abc123;trades=A1:")


def test_top_up_trades_get_the_same_ids_whatever_the_row_order():
    etfs = {**TOPUP_ETFS, "IVV": ("equity", "etf", False, 500.0)}
    book = Book(**etfs)
    book.account("A", SMALL, model=M_SPLIT, band=0.02)
    book.account("B", SMALL, model=M_SPLIT, band=0.02, restrictions=[("no_buy_symbol", "VGT")])
    book.account("C", {**SMALL, "QQQ": 1, "IVV": 1}, model={**M_SPLIT, "IVV": 0.12, "QQQ": 0.12, "BND": 0.26},
                 band=0.02)
    frames = book.frames()
    first = size_trades(**frames)
    recs, members = account_rebalances(first.accounts, "topup@1")
    ids = mint(recs, members, keyed(first.trades))
    assert ids == the_slow_way(recs, members, keyed(first.trades))
    for seed in (1, 2, 3):
        shuffled = size_trades(**{k: v.sample(fraction=1.0, shuffle=True, seed=seed) for k, v in frames.items()})
        assert mint(recs, members, keyed(shuffled.trades)) == ids


def test_every_frame_gets_the_minted_id_in_place_of_the_key():
    sized = _mixed_book().size()
    recs, members = account_rebalances(sized.accounts)
    ids = mint_recommendation_ids(recs, members, keyed(sized.trades), AS_OF, POLICY)
    trades = with_recommendation_ids(keyed(sized.trades).select(KEY, pl.all().exclude(KEY)), ids)
    assert trades.columns[0] == ID and KEY not in trades.columns
    accounts = with_recommendation_ids(
        sized.accounts.with_columns(provisional_key("rebalance", "account", pl.col("account_id")).alias(KEY)), ids)
    # Every trade of an account carries its recommendation's id.
    for acc in accounts.iter_rows(named=True):
        assert trades.filter(pl.col("account_id") == acc["account_id"])[ID].unique().to_list() in ([acc[ID]], [])
    # A null key stays null (a harvest candidate not proposed); a key never minted is an error.
    assert with_recommendation_ids(pl.DataFrame({KEY: [None]}, schema={KEY: pl.String}), ids)[ID].to_list() == [None]
    with pytest.raises(pl.exceptions.InvalidOperationError):
        with_recommendation_ids(pl.DataFrame({KEY: ["rebalance|account|NOT-MINTED"]}), ids)


def test_a_recommendation_key_must_be_unique():
    recs = pl.DataFrame({KEY: ["k", "k"], "kind": ["rebalance"] * 2, "scope": ["account"] * 2, "scope_id": ["A", "A"]})
    with pytest.raises(ValueError, match="unique"):
        mint_recommendation_ids(recs, pl.DataFrame(schema=MEMBER_SCHEMA), pl.DataFrame(schema=TRADE_SCHEMA), AS_OF, "p")


# ---------------------------------------------------------------------------------------------
# The invariants
# ---------------------------------------------------------------------------------------------

_ids = st.text(alphabet="AB1-:;,=%@|", min_size=1, max_size=4)
_trade = st.tuples(st.sampled_from(["A1", "A2", "A:3"]), st.sampled_from(["VTI", "BND", "B;X"]),
                   st.sampled_from(["buy", "sell"]), st.integers(1, 10**12).map(lambda u: u / 10**8))


@st.composite
def _book(draw):
    """A few recommendations (account and household scope, rebalance and harvest), with members
    and trades, and a permutation of each frame's rows."""
    scope_ids = draw(st.lists(_ids, min_size=1, max_size=4, unique=True))
    recs, members, trades = [], [], []
    for scope_id in scope_ids:
        for kind in draw(st.sets(st.sampled_from(["rebalance", "harvest"]), min_size=1)):
            scope = draw(st.sampled_from(["account", "household"]))
            key = f"{kind}|{scope}|{scope_id}"
            recs.append((key, kind, scope, scope_id))
            accounts = draw(st.lists(_ids, min_size=1, max_size=3, unique=True))
            members += [(key, a, draw(st.none() | _ids)) for a in accounts]
            trades += [(key, *t) for t in draw(st.lists(_trade, max_size=5, unique_by=lambda t: t[:3]))]
    frames = (pl.DataFrame(recs, schema=["recommendation_key", "kind", "scope", "scope_id"], orient="row"),
              pl.DataFrame(members, schema=MEMBER_SCHEMA, orient="row"),
              pl.DataFrame(trades, schema=TRADE_SCHEMA, orient="row"))
    shuffled = tuple(f[draw(st.permutations(list(range(f.height))))] if f.height else f for f in frames)
    return frames, shuffled


@settings(max_examples=150, deadline=None)
@given(_book())
def test_shuffled_rows_give_the_same_ids_and_a_rerun_the_same_ids(book):
    (recs, members, trades), (recs2, members2, trades2) = book
    ids = mint(recs, members, trades)
    assert mint(recs2, members2, trades2) == ids  # any row order
    assert mint(recs, members, trades) == ids  # a re-run of the day: no duplicate recommendation
    assert ids == the_slow_way(recs, members, trades)
    # Different recommendations never share an id (separators inside values are escaped).
    assert len(set(ids.values())) == len(ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(_trade, min_size=1, max_size=5, unique_by=lambda t: t[:3]), st.data())
def test_a_corrected_trade_gives_a_new_id(trades, data):
    before = one(trades)
    i = data.draw(st.integers(0, len(trades) - 1))
    account, symbol, side, quantity = trades[i]
    change = data.draw(st.sampled_from(["quantity", "symbol", "side", "account", "dropped"]))
    corrected = list(trades)
    if change == "quantity":  # the smallest change the feed can carry: 1e-8 share
        corrected[i] = (account, symbol, side, quantity + 1e-8)
    elif change == "symbol":
        corrected[i] = (account, symbol + "X", side, quantity)
    elif change == "side":
        corrected[i] = (account, symbol, "sell" if side == "buy" else "buy", quantity)
    elif change == "account":
        corrected[i] = (account + "X", symbol, side, quantity)
    else:
        del corrected[i]
    assert one(corrected) != before


def test_a_different_model_version_gives_a_different_recommendation_id():
    sized = _mixed_book().size()
    recs, v1 = account_rebalances(sized.accounts, "v1")
    _, v2 = account_rebalances(sized.accounts, "v2")
    a, b = mint(recs, v1, keyed(sized.trades)), mint(recs, v2, keyed(sized.trades))
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_a_buy_replaced_by_its_wash_sale_substitute_changes_the_id():
    proposed = [("A1", "VTI", "sell", 20.0), ("A1", "BND", "buy", 40.0)]
    substituted = [("A1", "VTI", "sell", 20.0), ("A1", "AGG", "buy", 20.0)]
    assert one(proposed) != one(substituted)


def test_harvest_and_rebalance_of_one_account_on_one_day_get_different_ids():
    trades = [("A1", "VTI", "sell", 60.0), ("A1", "SCHB", "buy", 120.0)]
    assert one(trades, kind="harvest") != one(trades, kind="rebalance")
    recs = pl.DataFrame({KEY: ["harvest|account|A1", "rebalance|account|A1"], "kind": ["harvest", "rebalance"],
                         "scope": ["account"] * 2, "scope_id": ["A1"] * 2})
    assert len(set(mint(recs, pl.DataFrame(schema=MEMBER_SCHEMA), pl.DataFrame(schema=TRADE_SCHEMA)).values())) == 2


def test_the_day_and_the_policy_are_part_of_the_id():
    trades = [("A1", "VTI", "sell", 10.0)]
    assert one(trades) != one(trades, as_of=date(2026, 11, 23))
    assert one(trades) != one(trades, policy="2026.12-1+def")


def test_a_household_id_changes_when_a_member_account_changes():
    models = {"TAX": "model:M@1", "IRA": "model:M@1", "ROTH": "ips"}
    trades = [("TAX", "BND", "sell", 400.0), ("TAX", "VTI", "buy", 200.0), ("IRA", "VTI", "sell", 400.0),
              ("IRA", "BND", "buy", 800.0)]
    household = one(trades, scope="household", scope_id="HH-1", models=models)
    # A member's trade changes (its quantity, or a buy becomes its substitute).
    assert one(trades[:3] + [("IRA", "BND", "buy", 801.0)], scope="household", scope_id="HH-1",
               models=models) != household
    assert one(trades[:3] + [("IRA", "AGG", "buy", 800.0)], scope="household", scope_id="HH-1",
               models=models) != household
    # A member's model version changes, even of a member without trades (ROTH).
    assert one(trades, scope="household", scope_id="HH-1", models={**models, "ROTH": "model:M@2"}) != household
    # A member joins the household's recommendation.
    assert one(trades, scope="household", scope_id="HH-1", models={**models, "529": "ips"}) != household
    # The same household, same members and trades: the same id, whatever the order given.
    assert one(list(reversed(trades)), scope="household", scope_id="HH-1",
               models=dict(reversed(list(models.items())))) == household


def test_a_value_cannot_pose_as_a_separator():
    # Without escaping, each pair would be written the same: "models=A:B:v", "trades=A:B:VTI:buy:…".
    assert one([], models={"A:B": "v"}) != one([], models={"A": "B:v"})
    assert one([("A", "B:VTI", "buy", 1.0)], models={}) != one([("A:B", "VTI", "buy", 1.0)], models={})
    assert canonical_text(AS_OF, "rebalance", "account", "A", "p", {}, [("A", "B:VTI", "buy", 1.0)]).endswith(
        "trades=A:B%3AVTI:buy:1.00000000")


def test_an_account_with_model_weights_sized_alone_and_with_others_gets_the_same_id():
    # Another account in the book changes nothing of this account's id.
    alone = Book().account("A", {"VTI": 700, "BND": 600}, model=M6040).size()
    both = Book().account("A", {"VTI": 700, "BND": 600}, model=M6040).account("B", {"VTI": 100}, model=M6040).size()
    ids_alone = mint(*account_rebalances(alone.accounts), keyed(alone.trades))
    ids_both = mint(*account_rebalances(both.accounts), keyed(both.trades))
    assert ids_alone["rebalance|account|A"] == ids_both["rebalance|account|A"]
