"""splitserve.protocol"""
