"""The testing recipe in docs/library.md runs as written."""

import re
from pathlib import Path

from leaderrun import leader_only

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"


def test_the_documented_unit_tests_pass():
    text = DOC.read_text()
    section = text[text.index("## Testing code that uses it") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)

    @leader_only
    def compact() -> int:
        return 1

    namespace: dict[str, object] = {"compact": compact}
    exec(compile(code, str(DOC), "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        assert callable(test)
        test()
