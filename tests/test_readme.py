"""The README starts with the two commands, and CI runs exactly the second one."""

import os
from pathlib import Path

import pytest

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```", 2)[1]
    return [line for line in block.strip().splitlines() if line.strip()]


def test_readme_starts_with_the_setup_and_test_commands():
    text = (REPO / "README.md").read_text()
    assert text.index("```") < text.index("\n\n", text.index("# segsynth")) + 3  # right under the title
    main, tests = _readme_commands()
    assert main.startswith("./scripts/setup && ") and "segsynth run " in main
    assert tests.startswith("./scripts/setup --dev && ")
    assert (REPO / main.split("segsynth run ")[1].split()[0]).is_file()  # the bundled input exists


def test_ci_runs_exactly_the_readme_test_command():
    lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "set -euo pipefail"
    assert lines[-1] == _readme_commands()[1]
    assert any("apt-get install" in ln and "ffmpeg" in ln for ln in lines)


@pytest.mark.skipif(not os.environ.get("CI"), reason="developers may use an editable install")
def test_ci_tests_the_installed_package_not_the_source_tree():
    import segsynth.export
    import segsynth.stream

    for module in (segsynth.stream, segsynth.export):
        assert "site-packages" in Path(module.__file__).parts, module.__file__
