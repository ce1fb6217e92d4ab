"""``sparsediff`` command line: bad arguments stop with one line saying what is allowed, not a traceback."""

import pytest

from sparsediff.cli import main


def parse_error(argv, capsys) -> str:
    """The error argparse prints for ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["1.5", "-0.2", "0", "0.5,abc"])
def test_bench_rejects_densities_outside_0_1(value, capsys):
    err = parse_error(["bench", "--densities", value], capsys)
    assert err.startswith("sparsediff bench: error: argument --densities:") and "(0, 1]" in err


def test_bench_reads_densities(monkeypatch, capsys):
    from sparsediff.commands import bench

    seen = {}

    def run_grid(sizes, densities, **kwargs):
        seen["densities"] = densities
        return []

    monkeypatch.setattr(bench, "run_grid", run_grid)
    assert main(["bench", "--densities", "1,0.25", "--sizes", "256"]) == 0
    assert seen["densities"] == [1.0, 0.25]


@pytest.mark.parametrize("flag, value", [("--steps", "-3"), ("--steps", "0"), ("--frames", "0"), ("--frames", "-1"),
                                         ("--height", "0"), ("--steps", "two")])
def test_generate_rejects_counts_below_one(flag, value, capsys):
    err = parse_error(["generate", flag, value], capsys)
    assert f"argument {flag}: expected a positive integer" in err


def test_probe_rejects_unknown_methods_listing_the_available_ones(capsys):
    from sparsediff.methods.base import available_specs

    err = parse_error(["probe", "--methods", "ba_att,nosuch"], capsys)
    assert err.startswith("sparsediff probe: error: argument --methods: unknown method 'nosuch'; available: ")
    assert all(name in err for name in available_specs() if name != "dense")
    assert "key=value" in parse_error(["probe", "--methods", "ba_att/beta"], capsys)
    assert "(0, 1]" in parse_error(["probe", "--densities", "1.5"], capsys)


def test_probe_checks_method_settings_before_running(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--methods", "ba_att/no_such_field=1", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparsediff probe: in method 'ba_att'") and "no_such_field" in line
    assert main(["probe", "--block-diffusion", "--methods", "fixed", "--out", str(out)]) == 2
    assert "'flashblock' or 'losa'" in capsys.readouterr().err
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_demo_rejects_ports_outside_1_65535(port, capsys):
    err = parse_error(["demo", "--port", port], capsys)
    assert err.startswith("sparsediff demo: error: argument --port: expected a port number 1..65535")


@pytest.mark.parametrize("argv", [["--help"], []])
def test_help_describes_the_tool_in_whole_sentences(argv, capsys):
    import sparsediff.cli

    if argv:
        with pytest.raises(SystemExit):
            main(argv)
    else:
        assert main(argv) == 2  # no command: the help, and a usage error
    out = " ".join(capsys.readouterr().out.split())
    summary = " ".join(sparsediff.cli.__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    assert summary.endswith(".") and summary in out
