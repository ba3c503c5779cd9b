"""solq.engine"""
