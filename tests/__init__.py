"""The test suite, laid out as src/cnnkit is (tests/ops, tests/data, ...). Every folder is a package, so test
files in different folders may share a name; shared fixtures live in tests/conftest.py (helpers import
from `tests.conftest`)."""
