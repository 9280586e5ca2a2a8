"""bla.eval"""
