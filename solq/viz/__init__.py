"""solq.viz"""
