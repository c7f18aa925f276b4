"""What a run leaves behind: report.json/md/html, release gating, expectation files, false-alarm tables."""
