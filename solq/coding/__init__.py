"""solq.coding"""
