"""tests/mutations.py stays applicable: code moves left entries whose text no longer exists (the script then says
NOT APPLIED and checks nothing), found only by an outside audit. Every entry's original text must be in its file
and every test it names must exist."""
import os
import re

import mutations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_mutation_applies_and_names_tests_that_exist():
    stale = []
    for name, path, old, new, tests in mutations.MUTATIONS:
        with open(os.path.join(ROOT, path)) as f:
            if old not in f.read():
                stale.append(f"{name}: its text is not in {path}")
        assert old != new, name
        for test in tests.split():
            file, _, func = test.partition("::")
            with open(os.path.join(ROOT, file)) as f:
                if func and not re.search(rf"^def {re.escape(func.split('[')[0])}\(", f.read(), re.M):
                    stale.append(f"{name}: no test {test}")
    assert not stale, "\n".join(stale)
