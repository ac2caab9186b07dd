"""Reports built from a run folder's results.json alone: statistics, leaderboard, plots, Markdown."""
