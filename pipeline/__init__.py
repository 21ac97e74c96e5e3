"""dinoseg's library, by concern (the README's Layout section is the map):

    io/        shared I/O: atomic writes, Parquet parts, run records, mask PNGs, RLE codecs
    data/      rows and their error protocol, listing, keys, manifests, decoding, pairs, metrics
    runtime/   the only package that imports Ray: start/join, resources, Ray Data stages, Ray Train
    segment/ train/ label/ evaluate/        one package per workflow, each with its run_X(config)
    selftrain/ demo/                        compositions of the workflows' run_X
    options.py option(...)/argument(...): a config field is a command-line option, declared once

Steps are plain callables over numpy-dict batches; only runtime/ turns them into Ray stages.
"""
