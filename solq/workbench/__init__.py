"""solq.workbench"""
