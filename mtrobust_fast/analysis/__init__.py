"""Analyses of attack results: results tables, reports, task selection, paired tests, CKA, loss landscapes and
adversarial-example panels. The table readers, the report and the selection import no torch, so the commands
that only read tables start fast."""
