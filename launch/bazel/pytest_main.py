"""Entry point of every Bazel py_test: runs the test file(s) in the target's `args` through pytest.

Bazel runs it from the target's runfiles tree (the repository's files, linked); TEST_TMPDIR is Bazel's
per-target scratch directory and XML_OUTPUT_FILE where Bazel reads the per-test results.
"""

import os
import sys

import pytest


def main() -> int:
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *sys.argv[1:]]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    code = pytest.main(args)
    return 1 if code == pytest.ExitCode.NO_TESTS_COLLECTED else int(code)


if __name__ == "__main__":
    sys.exit(main())
