"""The supervisory review report for the chief compliance officer (issue #16 item 3).

    report.py    the period's facts from the workflow store, in one frozen report model
    render.py    the same report as HTML, PDF and CSV, byte-identical for the same facts
    deliver.py   its SHA-256s recorded as one audit event, and emailed to the compliance users
    command.py   `rebal supervisory-report --from D --to D [--out DIR] [--email]`

No Dagster here: the job and the schedule are rebal_pipeline/defs/supervision/.
"""
