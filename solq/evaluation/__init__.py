"""solq.evaluation"""
