"""Integrations of curvhook with libraries that consume curvature.

- :mod:`curvhook.integrations.laplace`: ``CurvhookGGN`` and ``CurvhookEF``,
  curvature backends for laplace-torch (``pip install laplace-torch``; see
  docs/laplace.md).

The submodules import their library on import; this package itself imports
nothing optional.
"""
