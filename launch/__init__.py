"""splitserve.launch"""
