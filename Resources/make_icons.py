"""Draws the extension and module icons (an axial abdominal slice with organs in their segment colours).

    python Resources/make_icons.py HSAMSegment/Resources/Icons/HSAMSegment.png Resources/HSAMExtension.png

Needs Pillow. The PNG files are committed; run this only to change them.
"""
from PIL import Image, ImageDraw, ImageFont
import sys
def icon(size=128, label=True):
    S = 4*size
    im = Image.new("RGBA", (S, S), (0,0,0,0))
    d = ImageDraw.Draw(im)
    s = S/128
    d.rounded_rectangle([4*s,4*s,124*s,124*s], radius=22*s, fill=(32,46,66,255))
    # body (axial slice)
    d.ellipse([14*s,26*s,114*s,104*s], fill=(70,82,96,255), outline=(200,210,220,255), width=int(3*s))
    # liver (image left = patient right)
    d.ellipse([22*s,36*s,66*s,80*s], fill=(221,130,101,255))
    # stomach
    d.ellipse([64*s,38*s,92*s,62*s], fill=(160,139,76,255))
    # spleen
    d.ellipse([86*s,52*s,106*s,78*s], fill=(157,108,162,255))
    # kidneys
    d.ellipse([36*s,72*s,52*s,94*s], fill=(212,126,151,255))
    d.ellipse([76*s,72*s,92*s,94*s], fill=(212,126,151,255))
    # aorta + spine
    d.ellipse([58*s,68*s,68*s,78*s], fill=(224,97,76,255))
    d.ellipse([55*s,82*s,73*s,98*s], fill=(235,235,225,255))
    # pancreas
    d.ellipse([60*s,58*s,84*s,68*s], fill=(249,180,111,255))
    if label:
        try:
            f = ImageFont.truetype("DejaVuSans-Bold.ttf", int(15*s))
        except OSError:
            f = ImageFont.load_default()
        t = "H-SAM"
        w = d.textlength(t, font=f)
        d.text(((S-w)/2, 106*s), t, font=f, fill=(255,255,255,255))
    return im.resize((size,size), Image.LANCZOS)
icon(128, label=False).save(sys.argv[1])
icon(128, label=True).save(sys.argv[2])
