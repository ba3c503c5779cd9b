"""solq.data"""
