"""Trade tickets (stage 5): orders from an approved recommendation, as FIX 4.4 NewOrderSingle
messages or custodian-native CSV order files, each order carrying its SEC Rule 204-2(a)(3)
memorandum. Pure functions: no Dagster, no database (see docs/custodian_orders.md).

    orders = build_orders(package, approved_trades, decision, securities, accounts,
                          placed_by="TRD-0001", placed_at=now)
    batch = build_blocks(orders)                      # block orders across accounts
    write_fix_file(folder / "orders.fix", batch, FixSession(sender_comp_id="RIA", target_comp_id="DESK"))
    write_custodian_files(batch, folder)              # schwab / fidelity / pershing CSV
"""

from rebal_pipeline.tickets.dialects import (
    DIALECTS, FIDELITY, PERSHING, SCHWAB, Dialect, dialect_for, write_custodian_files,
)
from rebal_pipeline.tickets.fix import FixSession, encode_batch, new_order_single, read_fix_file, write_fix_file
from rebal_pipeline.tickets.fix44_dictionary import (
    FixDictionary, FixValidationError, load_fix44, validate, validate_wire,
)
from rebal_pipeline.tickets.orders import (
    AccountRef, ApprovalDecision, BlockOrder, Order, OrderMemo, SecurityRef, TicketBatch, TicketError, block_id,
    build_blocks, build_orders, cl_ord_id,
)

__all__ = [
    "AccountRef", "ApprovalDecision", "BlockOrder", "DIALECTS", "Dialect", "FIDELITY", "FixDictionary", "FixSession",
    "FixValidationError", "Order", "OrderMemo", "PERSHING", "SCHWAB", "SecurityRef", "TicketBatch", "TicketError",
    "block_id", "build_blocks", "build_orders", "cl_ord_id", "dialect_for", "encode_batch", "load_fix44",
    "new_order_single", "read_fix_file", "validate", "validate_wire", "write_custodian_files", "write_fix_file",
]
