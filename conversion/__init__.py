"""Conversion scripts: official SeTok checkpoints to Transformers folders, and Setokim composed from pretrained parts.

Each module runs as a script (`python conversion/convert_setok_official.py --help`) and imports as a module
(`from conversion.convert_setok_official import convert_setokim`) when the repository root is on `sys.path`.
"""
