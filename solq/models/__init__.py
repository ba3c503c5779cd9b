"""solq.models"""
