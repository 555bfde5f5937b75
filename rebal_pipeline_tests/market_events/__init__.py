"""Market-event batch scans: the intraday prices drop file and the reference basket's move."""
