"""splitserve.router"""
