"""splitserve.engine.model"""
