"""The supervisory review report's job and schedule (issue #16 item 3); the report itself is
rebal_pipeline/supervision/.
"""
