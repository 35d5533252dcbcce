"""splitserve.benchmarks"""
