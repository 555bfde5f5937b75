-- The quarantine: every feed row that could not be used, with file, line, column, value and
-- reason (docs/feed_contract.md). The raw file itself is preserved in the archive (feed_manifest).
select as_of, file, line, "column", value, reason, account_id
from {{ ref('int_feed_problems') }}
where as_of = $as_of
