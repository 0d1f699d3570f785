"""Script entry points of the conversion code, which lives in `transformers_setok.conversion`.

Each module runs as a script (`python conversion/convert_setok_official.py --help`, the same as `setok convert`) and
imports as a module (`from conversion.convert_setok_official import convert_setokim`) when the repository root is on
`sys.path`.
"""
