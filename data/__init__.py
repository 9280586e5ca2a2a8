"""bla.data"""
