"""File formats mmpt reads and writes as data: the export header, safe checkpoint reads, one-line messages
about third-party errors. Imports nothing of mmpt above the contracts."""
