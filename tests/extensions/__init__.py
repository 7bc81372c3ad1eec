"""What is particular to one extension of ``curvhook/extensions/`` (a package, so that file names may repeat elsewhere)."""
