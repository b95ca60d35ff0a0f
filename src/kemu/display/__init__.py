"""The host side of a graphics adapter: the display surface, VNC, screendump."""
