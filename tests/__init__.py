"""The test suite, a package so that tests import their helpers as ``tests._toy``,
``tests.passes._graphs``, ``tests.distributed._launch`` (pytest puts the repository root on
``sys.path``). Subpackages mirror ``lors_fx/``; shared fixtures are in ``conftest.py``."""
