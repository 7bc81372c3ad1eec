"""One test file per rule family of ``curvhook/rules/`` (a package, so that file names may repeat elsewhere)."""
