"""hwsi.demo"""
