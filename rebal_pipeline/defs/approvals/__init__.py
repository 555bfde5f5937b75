"""The approval workflow's Dagster shell (issue #5): the decision and escalation sensors, the
`execute_rebalance` job with its approval gate, and the `notify_recommendation` job.

The pause for an advisor's approval is durable, not a sleeping op (docs/architecture.md, "The approval
gate"): recommendations wait in the workflow store; sensors find what a human decided or what is
due, and launch short runs keyed so that each decision and each notification acts once.
"""
