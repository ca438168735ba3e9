"""check-config on a config at the size limit (issue #13 item 3): 20,000 Modbus registers in
~2 MiB of TOML, the largest file check-config accepts (config/load.py MAX_CONFIG_BYTES).

    .venv/bin/python bench/config_check.py [--registers 20000] [--repeat 3]

Prints the CPU time of check_config (best of --repeat) and, as the baseline measured in the
same run, the CPU time of parsing the same file with the standard library's tomllib alone: the
ratio says what validation adds to reading TOML, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux_edge.config.load import MAX_CONFIG_BYTES
from flux_edge.kinds import check_config


def registers_file(path: Path, registers: int, sources: int = 100) -> None:
    out = ['[daemon]\nstate_dir = "/tmp/x"\n']
    for s in range(sources):
        out.append(f'[sources.s{s}]\ntype = "modbus_tcp"\nhost = "127.0.0.1"\nport = {1000 + s}\n')
        for i in range(registers // sources):
            out.append(f'[[sources.s{s}.registers]]\nname = "r{i}"\nfunction = "holding"\n'
                       f'address = {i}\ntype = "uint16"\nscale = 0.1\n')
    path.write_text("".join(out))


def best(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()  # type: ignore[operator]
        times.append(time.process_time() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registers", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.toml"
        registers_file(path, args.registers)
        size = path.stat().st_size
        config, problems = check_config(path)
        if config is None:
            print("check-config refused it:", problems[:3])
            return 1
        parse = best(lambda: tomllib.loads(path.read_text()), args.repeat)
        check = best(lambda: check_config(path), args.repeat)
    print(f"{args.registers:,} registers, {size / 2**20:.2f} MiB "
          f"(limit {MAX_CONFIG_BYTES / 2**20:.0f} MiB)")
    print(f"| tomllib parse (baseline) | {parse:.2f} s CPU |")
    print(f"| check_config | {check:.2f} s CPU | {check / parse:.1f}x the parse |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
