"""Market-event batch scans (issue #16, item 2): intraday prices, the reference basket's move, the out-of-cycle scan."""
