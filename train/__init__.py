"""bla.train"""
