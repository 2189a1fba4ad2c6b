"""Local faults: faults of the holder's own host (its stderr, its clocks, its kernel,
the library's own threads), each scenario shown to break the guarantee without its fix.
"""
