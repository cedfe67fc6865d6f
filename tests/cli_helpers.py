"""What the CLI test modules share (not a test module): the one-line-error check and the tiny run."""

import pytest

from rwp_fast.cli import main


def one_line_error(capsys, argv, *needles):
    """main(argv) returns 2 and prints exactly one line on stderr, containing every needle."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch digits run (small CNN); its last.pt serves the eval and resume tests. Module-scoped: each
    test module that imports it gets its own run."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--attack-steps", "1", "--eval-attack-steps",
                 "1", "--train-examples", "64", "--eval-examples", "32", "--batch-size", "32", "--quiet",
                 "--device", "cpu", "--out-dir", str(out)]) == 0
    return out
