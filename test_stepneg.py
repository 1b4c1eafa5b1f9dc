"""Tests for stepneg.py. Run: python -m pytest -q"""
import collections
import dataclasses
import json
import math
import os
import random
import re
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the suite checks CPU semantics (fp32, resumes equal to float noise), also on a GPU box
import pytest  # noqa: E402
import torch  # noqa: E402

import stepneg as sn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# Answer checking
# ----------------------------------------------------------------------------------------------------------------

# Labelled (pred, gold, expected) pairs and extraction cases in the styles of real GSM8K and MATH answers,
# written for stepneg (not copied from another project's tests).
EQUIV_TABLE = [
    # GSM8K-style integers, separators, money, units
    ("72", "72", True), ("72", "27", False), ("1,000", "1000", True), ("1000", "1,000", True),
    ("12,345,678", "12345678", True), ("1,234", "1243", False), ("$18", "18", True), ("\\$18", "18", True),
    ("$18.00", "18", True), ("18.50", "18.5", True), ("18.05", "18.5", False), ("$1,200.00", "1200", True),
    ("5 hours", "5", True), ("5 apples", "5", True), ("6 dollars", "6", True), ("7 cents", "7", True),
    ("15 minutes", "16", False), ("3 cm^2", "3", True), ("-4", "-4", True), ("-4", "4", False),
    ("−4", "-4", True), ("+4", "4", True), ("0", "0.0", True), ("0", "-0", True), ("007", "7", True),
    ("10", "10.", True), ("100", "1e2", True), ("2.5e3", "2500", True), ("2.5e3", "250", False),
    ("1.5 \\times 10^{3}", "1500", True), ("3 \\cdot 10^2", "300", True), ("9", "9.0001", False),
    ("0.1", "0.10", True), (".5", "0.5", True), ("1/2", "0.5", True), ("1/3", "0.33", False),
    ("The answer is 5", "5", False),
    # percent and degrees
    ("50\\%", "50", True), ("50%", "50", True), ("50 percent", "50", True), ("50\\%", "0.5", True),
    ("25%", "0.5", False), ("0.5", "50\\%", True), ("90^\\circ", "90", True), ("90^{\\circ}", "90", True),
    ("90°", "90", True), ("90 degrees", "90", True), ("45^\\circ", "90", False), ("30\\text{ degrees}", "30", True),
    # fractions
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac{1}{2}", "1/2", True),
    ("\\frac12", "\\frac{1}{2}", True), ("\\frac1{2}", "0.5", True), ("\\frac{3}{4}", "0.75", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True), ("\\frac{1}{3}", "0.333", False), ("\\frac{1}{3}", "0.3333333", True),
    ("\\frac{1}{3}", "\\frac{2}{6}", True), ("-\\frac{1}{2}", "\\frac{-1}{2}", True), ("-\\frac{1}{2}", "\\frac{1}{2}", False),
    ("\\frac{7}{2}", "3.5", True), ("\\frac{7}{2}", "3\\frac{1}{2}", True), ("3\\frac{1}{2}", "3.5", True),
    ("2 \\frac{1}{4}", "\\frac{9}{4}", True), ("2 1/4", "2.25", True), ("2\\frac{1}{4}", "2.5", False),
    ("\\frac{10}{3}", "3\\frac{1}{3}", True), ("\\frac{a}{b}", "a/b", True), ("\\frac{x+1}{2}", "\\frac{1}{2}(x+1)", True),
    ("\\frac{\\pi}{2}", "\\frac12\\pi", True), ("\\frac{\\pi}{3}", "60", False),
    # roots and pi
    ("\\sqrt{2}", "\\sqrt2", True), ("2\\sqrt{2}", "\\sqrt{8}", True), ("\\sqrt{8}", "2.828", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\sqrt{12}", "2\\sqrt{3}", True), ("3\\sqrt{2}", "2\\sqrt{3}", False), ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{27}", "9", False), ("4\\sqrt{3}", "4 \\sqrt{3}", True), ("\\sqrt{3}+1", "1+\\sqrt{3}", True),
    ("2\\pi", "2 \\pi", True), ("\\pi", "3.14", False), ("\\pi", "π", True), ("6\\pi", "6π", True),
    ("\\pi r^2", "r^2\\pi", True), ("12\\pi", "12", False), ("\\frac{4\\pi}{3}", "\\frac{4}{3}\\pi", True),
    # powers and expressions
    ("2^{10}", "1024", True), ("2^10", "1024", True), ("3^4", "81", True), ("3^4", "64", False),
    ("x^2+2x+1", "(x+1)^2", True), ("x^2-1", "(x-1)(x+1)", True), ("x^2+1", "(x+1)^2", False),
    ("2x+3", "3+2x", True), ("2x", "2y", False), ("a+b", "b+a", True), ("ab", "ba", False), ("a-b", "b-a", False),
    ("y = 2x + 3", "2x+3", True), ("y=2x+3", "y = 2x + 3", True), ("x = 5", "5", True), ("x=5", "x = 6", False),
    ("k = -2", "-2", True), ("\\left( 3 \\right)", "3", True), ("e^{2}", "e^2", True),
    ("9^9^9^9", "1", False), ("10^{10^{10}}", "1", False), ("100!", "1", False),
    # tuples, intervals, unions
    ("(1, 2)", "(1,2)", True), ("(1, 2)", "(2, 1)", False), ("(1, 2)", "[1, 2]", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True), ("(3, \\frac{\\pi}{2})", "(3, \\pi)", False),
    ("(0.5, -1)", "(\\frac12, -1)", True), ("(1, 2, 3)", "(1, 2)", False), ("(-2, 7)", "(-2,7)", True),
    ("[0, 1)", "[0,1)", True), ("[0, 1)", "[0, 1]", False), ("(0, 1)", "(0, 1]", False), ("[-1, 4]", "[-1,4]", True),
    ("(-\\infty, 3]", "(-\\infty,3]", True), ("(-\\infty, 3]", "(-\\infty, 3)", False), ("(2, \\infty)", "(2, ∞)", True),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty,1)\\cup(2,\\infty)", True),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty, 1] \\cup (2, \\infty)", False),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2, \\infty)", False), ("x \\in [2, 5]", "[2, 5]", True),
    ("(1,2)", "1, 2", False),  # an ordered pair is not a list of values
    # unordered lists and sets
    ("1, 2", "2, 1", True), ("1, 2", "1, 3", False), ("1, 2, 3", "3, 1, 2", True), ("1, 2", "1, 2, 2", False),
    ("-2, 3", "3, -2", True), ("\\frac12, -1", "-1, 0.5", True), ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "1, 2", True), ("\\{1, 2\\}", "\\{1, 3\\}", False), ("2, -2", "\\pm 2", True),
    ("1 \\pm \\sqrt{2}", "1 + \\sqrt{2}, 1 - \\sqrt{2}", True),
    ("3, 5, 7", "3,5,7", True), ("0, 1", "0", False), ("\\sqrt{2}, -\\sqrt{2}", "-\\sqrt2, \\sqrt2", True),
    # matrices and vectors
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} \\frac{1}{2} \\\\ -3 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ -3 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix} 1 & 0 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", False),
    ("\\begin{pmatrix} -1 \\\\ \\sqrt{2} \\end{pmatrix}", "\\begin{pmatrix} -1 \\\\ \\sqrt2 \\end{pmatrix}", True),
    # text answers and choices
    ("\\text{Monday}", "Monday", True), ("\\text{Monday}", "monday", True), ("\\text{Monday}", "Tuesday", False),
    ("\\text{(C)}", "(C)", True), ("\\text{(B)}", "(C)", False), ("C", "\\text{C}", True), ("\\textbf{(A)}", "(A)", True),
    ("\\text{Evelyn}", "Evelyn", True), ("\\text{odd}", "\\text{even}", False), ("Yes", "yes", True),
    ("no", "yes", False), ("\\mbox{east}", "east", True), ("\\text{neither}", "\\text{ neither }", True),
    ("\\mathrm{Sunday}", "Sunday", True),
    # bases, subscripts, misc latex
    ("101_{2}", "101_2", True), ("101_2", "110_2", False), ("1A_{16}", "1A_16", True),
    ("10,\\!000", "10000", True), ("10,\\!000", "10,000", True), ("1,\\!000,\\!000", "1000000", True),
    ("\\$\\,5", "5", True), ("\\displaystyle\\frac{1}{4}", "0.25", True), ("\\left[ 1, 2 \\right]", "[1,2]", True),
    ("5.", "5", True), ("5\\,\\text{cm}", "5", True), ("5 \\text{ cm}", "5 cm", True),
    ("5\\text{ cm}^2", "5", True), ("\\infty", "∞", True), ("-\\infty", "\\infty", False),
    ("\\frac{1}{2}x", "\\frac{x}{2}", True), ("\\frac{x}{2}", "0.5x", True), ("\\sin(\\pi/6)", "\\frac12", True),
    ("\\log(e)", "1", True), ("N", "N", True), ("N(2)", "2", False), ("S", "s", False), ("i^2", "-1", True), ("2\\cdot 3", "6", True), ("2\\times 3", "6", True), ("6 \\div 3", "2", True),
    # malformed, empty, None, adversarial: never equal, never a crash
    (None, "1", False), ("1", None, False), (None, None, False), ("", "1", False), ("", "", False),
    ("garbage ]]{{", "1", False), ("\\frac{1}{", "\\frac{1}{2}", False), ("((((", "1", False),
    ("__import__('os')", "1", False), ("1; import os", "1", False), ("lambda: 1", "1", False),
    ("\\sqrt{", "1", False), ("{}", "1", False), ("nan", "nan", True), ("x" * 300, "1", False),
]
# Second round (forms MATH graders miss): every rule with an equal and a not-equal neighbour.
EQUIV_TABLE_2 = [
    # relations: spellings, sides swapped, both sides negated, double inequality and one-variable inequality as intervals
    ("x \\lt 2", "x < 2", True), ("x \\gt 2", "x > 2", True), ("x \\le 2", "x <= 2", True), ("x \\geq 2", "x >= 2", True),
    ("x \\neq 2", "x != 2", True), ("x \\ne 2", "x != 3", False), ("t < 2", "t > 2", False), ("t < 2", "2 > t", True),
    ("-x > -2", "x < 2", True), ("-x > -2", "x > 2", False), ("x \\le 2", "x < 2", False), ("2x + 1 < 5", "x < 2", True),
    ("0 \\le t \\le 4", "t \\in [0, 4]", True), ("0 \\le t \\le 4", "t \\in (0, 4]", False), ("0 < t \\le 4", "(0, 4]", True),
    ("x > 2", "(2, \\infty)", True), ("x > 2", "[2, \\infty)", False), ("x \\leq -1", "(-\\infty, -1]", True),
    ("x < 2", "x \\in (-\\infty, 2)", True), ("x < 2", "(2, \\infty)", False),
    # equations: the same solution set up to rearranging and scaling; a labelled answer against its bare value
    ("y = 2x + 1", "4x - 2y + 2 = 0", True), ("y = 2x + 1", "4x - 2y + 1 = 0", False), ("y = 2x + 1", "x = 2y + 1", False),
    ("\\frac{x^2}{4} + \\frac{y^2}{9} = 1", "9x^2 + 4y^2 = 36", True), ("\\frac{x^2}{4} + \\frac{y^2}{9} = 1", "4x^2 + 9y^2 = 36", False),
    ("(a, b) = (4, 1)", "(4, 1)", True), ("(a, b) = (4, 1)", "(1, 4)", False), ("g(2) = 5", "5", True), ("g(2) = 5", "2", False),
    ("|PQ| = 5", "5", True), ("|PQ| = 5", "6", False), ("x = 3, x = -4", "-4, 3", True), ("x = 3, x = -4", "3, 4", False),
    ("b_1 = 6, b_{10} = 2", "b_{10} = 2, b_1 = 6", True), ("b_1 = 6, b_{10} = 2", "b_1 = 2, b_{10} = 6", False),
    ("b_1 = 6, b_{10} = 2", "6, 2", True), ("x = 0.5, y = 2", "y = 2, x = \\frac12", True),
    ("x = 0.5, y = 2", "y = 2, z = 0.5", False),
    # \pm: the two values it stands for
    ("2 \\pm \\sqrt{3}", "2 + \\sqrt3, 2 - \\sqrt3", True), ("2 \\pm \\sqrt 3", "2 + \\sqrt 3", False), ("\\pm 7", "\\{-7, 7\\}", True),
    ("\\pm 7", "7", False), ("x = \\pm 7", "7, -7", True), ("\\mp 3", "3, -3", True), ("\\pm 7", "-7, 8", False),
    # number forms
    ("12{,}500", "12500", True), ("12{,}500", "1250", False), ("12 500", "12500", True), ("12\u2009500", "12500", True),
    ("12 500", "1250", False), ("0.\\overline{6}", "\\frac{2}{3}", True), ("0.\\overline{6}", "0.6", False),
    ("0.1\\overline{6}", "\\frac16", True), ("1.\\overline{3}", "\\frac{4}{3}", True), ("0.\\overline{3}", "\\frac23", False),
    ("0.666667", "\\frac{2}{3}", True), ("0.666666", "\\frac{2}{3}", False), ("0.667", "\\frac{2}{3}", False),
    ("1.41421", "\\sqrt{2}", True), ("1.41422", "\\sqrt{2}", False), ("3.14159", "\\pi", True), ("3.14", "\\pi", False),
    ("4!", "24", True), ("4!", "4", False), ("\\binom{6}{3}", "20", True), ("\\dbinom{6}{3}", "\\binom{6}{3}", True),
    ("\\binom{6}{2}", "20", False), ("\\frac{6!}{3!\\,3!}", "20", True), ("100!!!", "1", False), ("(3)!", "6", False),
    # text wrappers and separators
    ("\\cfrac{1}{2}", "0.5", True), ("\\cfrac{1}{3}", "0.5", False), ("\\textnormal{east}", "east", True),
    ("\\textbf{7}", "7", True), ("\\mathrm{7\\ cm}", "7", True), ("\\mbox{west}", "east", False),
    ("1 and 2", "1, 2", True), ("1 \\text{ or } 2", "2, 1", True), ("1; 2", "1, 2", True), ("1 \\quad 2", "\\{1, 2\\}", True),
    ("1 and 2", "1, 3", False), ("\\{3, 5\\}", "3, 5", True), ("\\text{Andrew}", "Andrew", True),
    # tuples and matrices
    ("(1; 2)", "(1, 2)", True), ("(1; 2)", "(2, 1)", False), ("(1, 2), (3, 4)", "(3, 4), (1, 2)", True),
    ("(1, 2), (3, 4), (1, 2)", "(3, 4), (1, 2)", True), ("(1, 2), (3, 4)", "(1, 2), (4, 3)", False),
    ("(0.5, 1), (2, 3)", "(2, 3), (\\frac12, 1)", True),
    ("\\left[ \\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array} \\right]", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
    ("\\left[ \\begin{array}{cc} 1 & 2 \\\\ 3 & 5 \\end{array} \\right]", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
    ("\\left( \\begin{matrix} 1 \\\\ 2 \\end{matrix} \\right)", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("(\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix})", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    # bounded simplify: identities, commutative factors
    ("\\csc^2 t", "1 + \\cot^2 t", True), ("\\csc^2 t", "1 + \\tan^2 t", False), ("\\sec^2 x - \\tan^2 x", "1", True),
    ("2ab + c", "c + 2ba", True), ("2ab + c", "c + 2ab^2", False), ("xy^2", "y^2 x", True), ("ab", "ba", False),
]
# Third round, the last families real answers use: named values against bare ones, a unit after a fraction, a set against
# \pm. Each family with equal and not-equal neighbours; no false "equal" (an expression after a fraction is no unit).
EQUIV_TABLE_3 = [
    # a gold that labels several values (segments, angles) against the bare values, in either order
    ("3, 8", "PQ=3, RS=8", True), ("8, 3", "PQ = 3, RS = 8", True), ("3, 9", "PQ=3, RS=8", False), ("3", "PQ=3, RS=8", False),
    ("RS = 8, PQ = 3", "PQ=3, RS=8", True), ("PQ = 8, RS = 3", "PQ=3, RS=8", False), ("PQ = 3, RT = 8", "PQ=3, RS=8", False),
    ("AB = 5", "5", True), ("AB = 5", "6", False), ("\\overline{AB} = 5", "5", True), ("m\\angle A = 30^\\circ", "30", True),
    ("\\angle ABC = 30", "30", True), ("\\angle ABC = 30", "60", False), ("AB = 4, BC = 5, CA = 6", "6, 5, 4", True),
    ("xy = 6", "6", False), ("ab = 6", "6", False),
    # a unit after a fraction (in \text, \textbf, \mathrm, or a bare unit word); a variable after it stays an expression
    ("\\frac{2}{5} \\text{ kg}", "2/5", True), ("\\frac{2}{5}\\textbf{kg}", "2/5", True), ("\\frac{2}{5}\\mathrm{kg}", "0.4", True),
    ("\\frac{2}{5} \\text{ kg}", "3/5", False), ("\\dfrac{2}{5}\\text{ kg}", "\\frac{2}{5}", True), ("2/5 kg", "\\frac25", True),
    ("\\frac{2}{5} kg", "0.4", True), ("2\\frac{1}{2} cups", "5/2", True), ("2\\frac{1}{2} cups", "2", False),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True), ("\\frac{270}7\\text{ degrees}", "270/8", False),
    ("\\frac{1}{2} x", "1/2", False), ("\\frac12 bh", "\\frac12", False), ("\\frac{1}{2}bh", "\\frac{bh}{2}", True),
    ("\\frac{\\sqrt{3}}2", "\\sqrt{3}/2", True), ("\\frac{\\sqrt{3}}2", "\\sqrt{3}/3", False),
    # a set in braces against \pm, whichever side carries a unit or writes the sign as one character
    ("\\{-7, 7\\}", "\\pm 7", True), ("\\{7, -7\\}", "±7", True), ("\\{-7, 7\\}", "+/- 7", True), ("\\{-7, 8\\}", "±7", False),
    ("\\{-7, 7\\}", "\\pm 7\\text{ cm}", True), ("\\{-7\\text{ cm}, 7\\text{ cm}\\}", "\\pm 7", True),
    ("\\{7\\}", "\\pm 7", False), ("\\{-7, 0, 7\\}", "\\pm 7", False), ("\\{-7, 0, 7\\}", "\\pm 7, 0", True),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1 + \\sqrt5, 1 - \\sqrt5", True), ("\\{1\\pm\\sqrt{5},-2\\}", "1 \\pm \\sqrt5", False),
]
EXTRACT_TABLE = [
    # "The answer is" lines
    ("7 + 5 = 12\n12 - 3 = 9\nThe answer is 9", "9"), ("The answer is 9.", "9"), ("The answer is: 42", "42"),
    ("So the answer is $18.", "18"), ("the answer is 3 apples", "3 apples"), ("The final answer is 7", "7"),
    ("The answer is 1,250.", "1,250"), ("The answer is -3.5", "-3.5"), ("The answer is \\frac{1}{2}", "\\frac{1}{2}"),
    ("The answer is 4. Then more text\nThe answer is 5", "5"), ("The answer is $\\boxed{12}$", "12"),
    ("The answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"), ("The answer is (1, 2).", "(1, 2)"),
    ("The answer is 5\n\nExplanation follows.", "5"), ("The answer is", None), ("The answer is .", None),
    # GSM8K ####
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"), ("#### 1,000", "1,000"), ("#### -3", "-3"), ("####5", "5"),
    ("work\n#### 18\n", "18"), ("#### 0.5", "0.5"), ("The answer is 3. But wait, #### 4", "4"),
    ("#### 4\nThe answer is 5", "5"), ("#### $20", "20"),
    # \boxed / \fbox
    ("Thus the area is $\\boxed{\\frac{\\sqrt{3}}{4}}$.", "\\frac{\\sqrt{3}}{4}"), ("\\boxed{5}", "5"),
    ("We get \\boxed{2} first, then \\boxed{(1, -2)}.", "(1, -2)"), ("\\fbox{5}", "5"), ("\\boxed 7", "7"),
    ("$\\boxed{\\dfrac{1}{2}}$", "\\dfrac{1}{2}"), ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"), ("\\boxed{\\text{(C)}}", "\\text{(C)}"), ("\\boxed{10\\%}", "10\\%"),
    ("\\boxed{}", None), ("\\boxed{\\frac{1}{2}", None), ("\\boxed{{{}", None), ("so \\boxed{3}.$$", "3"),
    ("Final: $\\boxed{-\\infty}$", "-\\infty"), ("\\boxed{1,2,3}", "1,2,3"), ("\\boxed{90^\\circ}", "90^\\circ"),
    ("\\boxed{\\$5}", "\\$5"), ("text \\boxed{a} more \\fbox{b}", "b"), ("\\fbox{b} then \\boxed{a}", "a"),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}"), ("\\boxed{2}.", "2"),
    # none, junk, types
    ("no final answer here", None), ("", None), (None, None), (42, None), ("answer: 5", None),
    ("The number is 5", None), ("{" * 2000 + "\\boxed{1}", "1"), ("\\boxed{" * 3000, None),
    ("The answer is " + "9" * 50, "9" * 50), ("\u00a0The answer is 8", "8"), ("THE ANSWER IS 8", None),
    ("#### ", None), ("The answer is 12\r\n", "12"), ("the answer is: (2, 3]", "(2, 3]"),
    ("The answer is $35$.", "35"), ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"), ("The answer is $$", None),
    ("The answer is $.$", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_TABLE)
def test_extract_answer(text, expected):
    assert sn.extract_answer(text) == expected


def test_the_last_answer_marker_wins_even_on_one_line():
    assert sn.extract_answer("The answer is 9" * 3) == "9"
    assert sn.extract_answer("The answer is 8. No wait, the answer is 9") == "9"


@pytest.mark.parametrize("pred,gold,expected", EQUIV_TABLE + EQUIV_TABLE_2 + EQUIV_TABLE_3)
def test_is_equiv(pred, gold, expected):
    assert sn.is_equiv(pred, gold) is expected
    assert sn.is_equiv(gold, pred) is expected  # the checker is symmetric


def test_checker_is_bounded_and_never_raises():
    evil = ["9^9^9^9^9", "10^{10^{10}}", "(" * 5000, "{" * 3000 + "1", "1" * 100_000, "__import__('os').system('x')",
            "\\frac{" * 500, "x" * 200 + "!" * 50, "\\sqrt{\\sqrt{\\sqrt{" * 100, "((((((9**9**9))))))",
            "100!!!", "9!!!!!!", "\\binom{999999999}{500000}", "\\binom{9999}{5000}", "0.\\overline{" + "9" * 5000 + "}",
            "x^{2^{2^{2}}} = 1", "1 < x < 2 < 3", "\\pm" * 50, "a = " * 300 + "1", "; and or \\quad " * 100]
    for s in evil:
        t0 = time.time()
        sn.extract_answer(s)
        sn.is_equiv(s, "1")
        sn.is_equiv("The answer is " + s, s)
        assert time.time() - t0 < 2.0, s[:40]


def test_fuzz_checker_never_raises_and_stays_fast():
    import random
    rng = random.Random(0)
    atoms = ["1", "23", "-", "+", "*", "/", "^", "(", ")", "[", "]", "{", "}", ",", ".", "=", "x", "\\frac", "\\sqrt",
             "\\boxed{", "\\text{", "\\pi", "%", "$", " ", "The answer is ", "#### ", "\\left(", "e", "!", "__", "\\\\",
             "<", ">=", "\\le ", "\\neq", "\\pm", "\\overline{", "\\binom{", ";", " and ", "\\quad", "\\in", "|", "_",
             "±", "PQ", " kg", "\\angle ", "\\textbf{"]
    marker = f"/tmp/stepneg-fuzz-{os.getpid()}"
    evil = [f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')", "exec('1')", "eval('1')",
            "globals()", "().__class__.__bases__", "lambda: 0", "sympify('x')", "\\input{/etc/passwd}"]
    for s in evil:
        for wrapped in (s, f"\\boxed{{{s}}}", f"The answer is {s}"):
            # bare, the text holds no answer; wrapped, its answer is the text itself, equal to itself
            assert sn.is_equiv(sn.extract_answer(wrapped), s) is (wrapped != s)
            assert sn.is_equiv(s, "1") is False
    assert not os.path.exists(marker)
    slowest = 0.0
    for _ in range(3000):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        t0 = time.time()
        a = sn.extract_answer(s)
        assert a is None or isinstance(a, str)
        assert isinstance(sn.is_equiv(a, s), bool) and isinstance(sn.is_equiv(s, "2"), bool)
        slowest = max(slowest, time.time() - t0)
    assert slowest < 1.0


def test_a_slow_first_sympy_import_is_not_cut_by_the_time_limit():
    """On a cold machine importing sympy can take longer than the 0.5 s bound; it must not count against it."""
    import subprocess
    import sys
    code = (
        "import builtins, sys, time\n"
        "real = builtins.__import__\n"
        "def slow(name, *a, **k):\n"
        "    if name.startswith('sympy') and 'sympy' not in sys.modules: time.sleep(0.8)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = slow\n"
        "import stepneg as sn\n"
        "print(sn.is_equiv('\\\\frac{1}{2}', '0.5'), sn.is_equiv('\\\\sqrt{8}', '2\\\\sqrt{2}'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr[-500:]


def test_every_shipped_solution_checks_correct():
    for p in sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"), 500):
        assert sn.reward(p["response"], p["gold"]) == 1


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def test_make_data_reproduces_shipped_files_byte_for_byte(tmp_path):
    for task in ("bigstep", "arith", "star"):
        train, test = sn.make_toy_data(task)
        sn.write_jsonl(str(tmp_path / "train.jsonl"), train)
        sn.write_jsonl(str(tmp_path / "test.jsonl"), test)
        for name in ("train.jsonl", "test.jsonl"):
            assert (tmp_path / name).read_bytes() == open(os.path.join(HERE, "data", task, name), "rb").read()
        assert not {p["question"] for p in train} & {p["question"] for p in test}


def test_bigstep_answers_cannot_be_guessed_and_its_teacher_takes_big_steps():
    train = sn.load_problems(os.path.join(HERE, "data/bigstep/train.jsonl"))
    test = sn.load_problems(os.path.join(HERE, "data/bigstep/test.jsonl"))
    top = collections.Counter(p["gold"] for p in train).most_common(1)[0][0]
    assert sum(p["gold"] == top for p in test) / len(test) <= 0.02                   # the best constant answer
    last = sum(re.findall(r"\d+", p["question"])[-1] == p["gold"] for p in test) / len(test)
    assert last <= 0.02                                                              # the question's last number
    assert all(sn.first_wrong_step(sn.split_steps(p["response"]), p["question"]) is None for p in train)
    lines = [line for p in train for line in p["response"].split("\n")[:-1]]
    ops = collections.Counter(len(re.findall(r" [-+*/] ", line)) for line in lines)
    assert 0.1 < ops[2] / len(lines) < 0.13 and 0.1 < ops[3] / len(lines) < 0.13 and max(ops) == 3  # 2- and 3-op lines
    base = sn.base_corpus(0, 2000)
    story = set(sn.NAMES + sn.ITEMS + ["has", "How", "many", "now?"])
    assert all(e["question"].startswith("Compute ") and sn.toy_chain(e["question"]) is None
               and not set(e["question"].split()) & story for e in base)  # never a word problem: nobody has anything
    in_words = sum(bool(re.search(r"[a-z]", e["question"][8:])) for e in base) / len(base)
    assert 0.45 < in_words < 0.55                                                    # half the lists in the task's phrases
    assert all(sn.TOY_STEP.fullmatch(line) and len(re.findall(r" [-+*/] ", line)) == 1
               for e in base for line in e["response"].split("\n")[:-1])             # one operation a line


def test_the_sloppy_teachers_slips_cancel_and_the_truth_finds_them():
    """--slips P: a share P of D_syn solutions carry two slips that cancel; the answer and every later line stay the
    teacher's; first_wrong_step points at the first slip; the choice is deterministic."""
    train = sn.load_problems(os.path.join(HERE, "data/bigstep/train.jsonl"), 2000)
    slipped = sn.with_slips(train, 0.3)
    assert slipped == sn.with_slips(train, 0.3) and sn.with_slips(train, 0.0) == train
    changed = [(p, q) for p, q in zip(train, slipped) if p["response"] != q["response"]]
    eligible = sum(len(p["response"].split("\n")) >= 3 for p in train)
    assert 0.25 < len(changed) / eligible < 0.35
    for p, q in changed:
        a, b = p["response"].split("\n"), q["response"].split("\n")
        assert a[2:] == b[2:] and sn.reward(q["response"], p["gold"]) == 1          # back on the chain, same answer
        first, second = sn.TOY_STEP.fullmatch(b[0]), sn.TOY_STEP.fullmatch(b[1])
        assert int(second[1]) == int(first[3]) != int(sn.TOY_STEP.fullmatch(a[0])[3])  # the next line reads the slip
        assert sn.first_wrong_step(sn.split_steps(q["response"]), q["question"]) == 1
    assert sn.has_toy_truth(slipped)  # the truth measurements stay on for the variant


def test_reads_gsm8k_math_and_plain(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Q1?", "answer": "Half of 48 is 48/2 = <<48/2=24>>24.\n#### 24"},
        {"problem": "P2?", "solution": "So it is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "P3?", "solution": "Thus \\boxed{3}.", "answer": "3"},
        {"question": "Q4?", "answer": "7", "response": "3 + 4 = 7\nThe answer is 7"},
        {"question": "Q5?", "answer": "7"},
    ]) + "\n")
    ps = sn.load_problems(str(f))
    assert [p["gold"] for p in ps] == ["24", "\\frac{1}{2}", "3", "7", "7"]
    assert ps[0]["response"] == "Half of 48 is 48/2 = 24.\nThe answer is 24"
    assert ps[4]["response"] is None
    assert all(sn.reward(p["response"], p["gold"]) for p in ps[:4])


@pytest.mark.parametrize("content,message", [
    ('{"question": "q", "answer": "1"}\n{"question": "q2", "answer": \n', "line 2: not valid JSON"),
    ('{"question": "q", "answer": "1"}\n{"question": "q2"}\n', "line 2: field 'answer'"),
    ('{"problem": "p", "solution": "no box"}\n', "line 1: field 'solution' has no \\boxed"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ("", "no problems (empty file)"),
])
def test_bad_input_names_file_line_and_field(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        sn.load_problems(str(f))
    assert str(f) in str(e.value) and message in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization at the prompt|response boundary
# ----------------------------------------------------------------------------------------------------------------


def bpe_tokenizer():
    """A byte-level BPE trained offline on a few lines, so merges cross word boundaries like real ones do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["Answer:\n12 + 30 = 42\nThe answer is 42", "Question: Mia has 7 pens.\nAnswer:\n7 + 5 = 12"] * 50
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")


def test_bpe_boundary_prompt_then_response_tokens():
    tok = bpe_tokenizer()
    prompt, response = "Question: Mia has 7 pens.\nAnswer: ", "7 + 5 = 12\nThe answer is 12"
    naive = tok(prompt + response)["input_ids"]
    p_alone, r_alone = tok(prompt)["input_ids"], tok(response)["input_ids"]
    assert naive != p_alone + r_alone  # the trap is real: a merge straddles the boundary
    p, r = sn.encode(tok, prompt, response, complete=True)
    assert p == p_alone and r == r_alone + [tok.eos_token_id]
    ids, att, mask, _ = sn.batch_tensors(tok, [(p, r)], 512, "cpu")
    assert ids[0].tolist() == p + r
    assert mask[0].tolist() == [0.0] * len(p) + [1.0] * len(r)
    assert tok.decode(ids[0][mask[0].bool()].tolist(), skip_special_tokens=True) == response
    _, r_partial = sn.encode(tok, prompt, response, complete=False)
    assert r_partial == r_alone  # a partial step never gets EOS


# ----------------------------------------------------------------------------------------------------------------
# Steps, first pit, pairs
# ----------------------------------------------------------------------------------------------------------------


def test_split_steps_lines_and_roundtrip():
    text = "7 + 5 = 12\n12 - 3 = 9\nThe answer is 9"
    assert sn.split_steps(text) == ["7 + 5 = 12\n", "12 - 3 = 9\n", "The answer is 9"]
    math_text = "First,\nwe note that $x^2 = 4$.\nSo\n$x = 2$ or $x = -2$.\n\nHence \\boxed{2}."
    steps = sn.split_steps(math_text)
    assert "".join(steps) == math_text and all(len(s.split()) >= 3 for s in steps[:-1])
    assert steps[0] == "First,\nwe note that $x^2 = 4$.\n"
    paragraph = " ".join(f"Sentence {i} says that $x_{i} = {i}$ holds here." for i in range(20)) + "\nSo \\boxed{3}."
    pieces = sn.split_steps(paragraph, cap=50)
    assert "".join(pieces) == paragraph and len(pieces) >= 10 and max(len(p) for p in pieces) < 400
    long = "\n".join(f"line number {i} = {i}" for i in range(40))
    capped = sn.split_steps(long, cap=12)
    assert len(capped) == 12 and "".join(capped) == long


def tiny_lm():
    model, tok = sn.load_model(sn.Config(d_model=32, n_layers=2, n_heads=2), "tiny")
    return model, tok


def test_sampler_writes_what_transformers_generate_writes():
    """Same rows, same seed: stepneg's decode loop (shared prompts read once, finished rows dropped from the batch)
    and model.generate write the same text. An EOS bonus on the logits makes rows finish at different steps."""
    model, tok = tiny_lm()
    questions = ["Ava has 3 pens.", "Ben has 12 apples. Ben sells 4.", "Cal has 7 cards. Cal doubles them. Ok?"]
    prompts = [sn.PROMPT.format(question=q) for q in questions for _ in range(4)] + [sn.PROMPT.format(question="x")]
    bonus = torch.zeros(len(tok))
    bonus[tok.eos_token_id] = 2.0
    for temperature, eos_bonus in ((0.0, False), (0.7, True), (1.0, True)):
        hook = model.lm_head.register_forward_hook(lambda m, i, out: out + bonus) if eos_bonus else None
        ours, n, read = sn.generate(model, tok, prompts, temperature, 24, 5)
        theirs, m = sn.transformers_generate(model, tok, prompts, temperature, 24, 5)
        assert ours == theirs and n == m
        if eos_bonus:
            hook.remove()
            assert min(n) < max(n) == 24 and len(set(n)) > 3  # rows finished at different steps: the batch shrank
    assert read == sum(len(tok(p)["input_ids"]) for p in set(prompts))  # each distinct prompt read once


def test_a_row_stops_after_its_finished_answer_line():
    model, tok = tiny_lm()
    forced = tok("7 + 5 = 12\nThe answer is 12\nand on and on", add_special_tokens=False)["input_ids"]
    calls = {"n": 0}

    def force(module, inputs, out):  # the k-th forward writes forced token k, whatever the model thinks
        logits = torch.full_like(out, -1e9)
        logits[..., forced[min(calls["n"], len(forced) - 1)]] = 0.0
        calls["n"] += 1
        return logits
    model.lm_head.register_forward_hook(force)
    texts, n, _ = sn.generate(model, tok, [sn.PROMPT.format(question="q")] * 2, 0.7, 40, 0)
    assert texts == ["7 + 5 = 12\nThe answer is 12"] * 2
    assert n == [len(tok("7 + 5 = 12\nThe answer is 12\n", add_special_tokens=False)["input_ids"])] * 2


def test_tiny_tokenizer_is_lossless_and_spells_toy_words_as_one_token():
    tok = sn.tiny_tokenizer()
    row = sn.load_problems("data/arith/train.jsonl", 1)[0]
    text = sn.PROMPT.format(question=row["question"]) + row["response"] + "\nnaïve ∫ 0.5x^2 {}\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # anything the toy's words don't cover falls back to bytes
    assert len(ids) < len(text.encode()) / 2
    assert [tok.decode([i]) for i in tok(" Mia buys 12 more", add_special_tokens=False)["input_ids"]] == \
        [" Mia", " buys", " ", "1", "2", " more"]  # digits one per token


def test_help_explains_every_flag_from_the_config_block(capsys):
    with pytest.raises(SystemExit):
        sn.parse_config(["--help"])
    text = capsys.readouterr().out
    helps, groups = sn.config_help()
    for f in dataclasses.fields(sn.Config):
        assert helps[f.name] and f"--{f.name}" in text, f.name
    assert "{first_pit,min_advantage}" in text and "per-step credit:" in text and "M (the paper's Best-of-K" in text
    assert helps["gen_tokens"].endswith("half the free GPU memory on CUDA")  # a comment's second line is kept
    with pytest.raises(SystemExit):
        sn.parse_config(["--credit", "best"])
    for bad in (["--eval_k", "-1"], ["--beta_awr", "0"], ["--rollouts", "0"], ["--val", "-1"], ["--base_steps", "-5"],
                ["--task", "gsm8k"]):
        with pytest.raises(SystemExit):
            sn.parse_config(bad)


def test_defaults_depend_on_the_mode_and_task():
    cfg = sn.parse_config([])
    assert (cfg.task, cfg.n_train, cfg.train, cfg.test) == ("bigstep", 2000, "data/bigstep/train.jsonl",
                                                            "data/bigstep/test.jsonl")
    cfg = sn.parse_config(["--task", "arith"])
    assert (cfg.n_train, cfg.train, cfg.test) == (1000, "data/arith/train.jsonl", "data/arith/test.jsonl")
    assert sn.parse_config(["--task", "arith", "--train", "x.jsonl"]).train == "x.jsonl"
    assert (sn.parse_config(["--mode", "scaling"]).n_train, sn.parse_config(["--mode", "scaling"]).val) == (960, 300)
    assert (sn.parse_config(["--mode", "scaling", "--task", "arith"]).n_train, sn.parse_config([]).val) == (500, 0)
    assert sn.parse_config(["--mode", "scaling", "--n_train", "64"]).n_train == 64
    # scaling picks each SFT's checkpoint on --val, so it trains 12 epochs; without validation, or elsewhere, 16
    assert [sn.parse_config(a).sft_epochs for a in (["--mode", "scaling"], ["--mode", "scaling", "--val", "0"], [],
            ["--mode", "scaling", "--task", "arith"], ["--mode", "scaling", "--sft_epochs", "5"])] == [12, 16, 16, 16, 5]
    # ... and 4n and 8n longer, on the default task only; an explicit --sft_epochs or other --doublings: one for all
    assert [sn.parse_config(a).size_epochs for a in (["--mode", "scaling"], ["--mode", "scaling", "--sft_epochs", "5"],
            ["--mode", "scaling", "--doublings", "2"], ["--mode", "scaling", "--task", "arith"], [])] == \
        ["12,12,24,16", "", "", "", ""]
    for bad in ("12,12", "12,x,24,16", "12,,24,16"):
        with pytest.raises(SystemExit):
            sn.parse_config(["--mode", "scaling", "--size_epochs", bad])


def test_sampling_batches_keep_to_the_token_budget():
    tok = sn.tiny_tokenizer()
    rows = [(str(i), "Q" * (5 + 7 * (i % 5))) for i in range(40)]
    plain = sn.gen_batches(None, tok, rows, sn.Config(gen_batch=16))
    assert [len(b) for b in plain] == [16, 16, 8]
    cfg = sn.Config(gen_batch=16, gen_tokens=400, max_new_tokens=10)
    batches = sn.gen_batches(None, tok, rows, cfg)
    assert [r for b in batches for r in b] == rows and len(batches) > 3
    for b in batches:
        assert len(b) <= 16 and len(b) * (max(len(p) + 1 for _, p in b) + 10) <= 400  # +1: the <s> token


def test_length_sorted_batches_cover_every_example_once_with_little_padding():
    import random
    lengths = [random.Random(i).choice([10, 50, 200]) for i in range(512)]
    plain = sn.epoch_batches(random.Random(0), lengths, sn.Config(batch_size=16))
    order = list(range(512))
    random.Random(0).shuffle(order)
    assert plain == [order[b:b + 16] for b in range(0, 512, 16)]  # off: the same shuffle as always
    batches = sn.epoch_batches(random.Random(0), lengths, sn.Config(batch_size=16, sort_len=True))
    assert sorted(i for b in batches for i in b) == list(range(512))
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa
    assert padding(batches) < padding(plain) / 10


def test_find_pit_rules():
    assert sn.find_pit([0.5, 1.0, 0.25, 0.0, 0.0], "first_pit") == 3
    assert sn.find_pit([0.5, 1.0, 0.25, 0.0, 0.0], "min_advantage") == 2
    assert sn.find_pit([0.5, 0.0], "first_pit") == 1
    assert sn.find_pit([0.0, 0.0, 0.0], "first_pit") is None    # never alive: no pair
    assert sn.find_pit([0.5, 0.5, 1.0], "min_advantage") is None  # no step loses value: no pair


def scripted_generate(prompts, *_):
    """A fake policy with known values: it finishes any prompt correctly unless the prompt holds a step marked
    BAD, after which it always fails. Answers are the toy's: the gold is always 9."""
    texts = ["The answer is 8" if "BAD" in p else "ok\nThe answer is 9" for p in prompts]
    return texts, [len(t) for t in texts], 0


def test_best_of_k_values_by_hand():
    """--value bok: the chance that the best of K = 5 rollouts succeeds, from c of M = 8: 1 - C(8 - c, 5) / C(8, 5)."""
    by_hand = [0, 35 / 56, 50 / 56, 55 / 56, 1, 1, 1, 1, 1]  # C(8,5) = 56; C(7,5) = 21, C(6,5) = 6, C(5,5) = 1, then 0
    assert [sn.bok_value(c / 8, 8, 5) for c in range(9)] == pytest.approx(by_hand)
    assert sn.bok_value(0.5, 4, 5) == pytest.approx(1 - 0.5 ** 5)  # fewer samples than K (at x): the plug-in
    assert sn.bok_value(None, 8, 5) is None
    Q = {"n0": [0.5, 7 / 8, 2 / 8, 0.0]}
    cfg = sn.Config(k_samples=4, rollouts=8, credit="min_advantage")
    assert sn.find_pit(sn.credit_values(Q, cfg)["n0"], "min_advantage") == 2   # mean: A = +.375, -.625, -.25
    bok = sn.credit_values(Q, dataclasses.replace(cfg, value="bok"))["n0"]     # BoK: 31/32, 1, 50/56, 0
    assert bok == pytest.approx([31 / 32, 1.0, 50 / 56, 0.0])
    assert sn.find_pit(bok, "min_advantage") == 3  # under Best-of-K, step 2 barely hurts; step 3 kills the prefix
    assert sn.find_pit(bok, "first_pit") == sn.find_pit(Q["n0"], "first_pit") == 3  # the first pit: the same


@pytest.mark.parametrize("credit", ["first_pit", "min_advantage"])
def test_rollout_search_finds_the_planted_step(tmp_path, monkeypatch, credit):
    monkeypatch.setattr(sn, "generate", lambda model, tok, prompts, *a: scripted_generate(prompts))
    cfg = sn.Config(rollouts=3, credit=credit, out=str(tmp_path))
    problems = [{"question": f"q{i}", "gold": "9", "response": None} for i in range(3)]
    wrong = ["step one ok\nstep two ok\nstep BAD three\nstep four xx\nThe answer is 8",
             "step one BAD\nstep two ok\nThe answer is 8",
             "step one ok\nstep two ok\nThe answer is 7"]
    samples = [{"responses": [w, "The answer is 9"], "correct": [0, 1]} for w in wrong]
    negs = sn.collect_negatives(problems, samples, cap=8)
    Q, wins, acct = sn.step_values(None, None, problems, samples, negs, cfg, str(tmp_path))
    assert Q[0][1:4] == [1.0, 1.0, 0.0] and Q[1][1] == 0.0 and Q[2] == [0.5, 1.0, 1.0, 0.0]
    pairs = sn.per_step_pairs(problems, negs, Q, wins, cfg)
    assert [p["pit"] for p in pairs] == [3, 1, 3]
    assert pairs[0]["prompt"].endswith("Answer:\nstep one ok\nstep two ok\n")
    assert pairs[0]["rejected"] == "step BAD three\n" and pairs[0]["chosen"] == "ok\nThe answer is 9"
    assert pairs[1]["prompt"] == sn.PROMPT.format(question="q1") and pairs[1]["rejected"] == "step one BAD\n"
    assert pairs[2]["rejected"] == "The answer is 7"
    # first_pit stops exploring a negative at its pit; min_advantage explores every prefix but the last
    assert acct["rollouts"] == 3 * ((3 + 1 + 2) if credit == "first_pit" else (4 + 2 + 2))


def test_killed_rollouts_resume_to_the_same_pairs(tmp_path, monkeypatch):
    """A seeded random policy, so a resumed run that batched or seeded differently would give other values."""
    import random

    def seeded(model, tok, prompts, temperature, max_new, seed):
        rng = random.Random(seed)
        texts = ["ok\nThe answer is 9" if rng.random() < (0.2 if "BAD" in p else 0.7) else "The answer is 1"
                 for p in prompts]
        return texts, [1] * len(texts), 0
    problems = [{"question": f"q{i}", "gold": "9", "response": None} for i in range(6)]
    samples = [{"responses": [f"a{i} ok\nb{i} BAD here\nc{i} step three\nThe answer is 1", "The answer is 9"],
                "correct": [0, 1]} for i in range(6)]
    cfg = sn.Config(rollouts=3, gen_batch=6)

    def run(out_dir):
        negs = sn.collect_negatives(problems, samples, cap=8)
        Q, wins, acct = sn.step_values(None, None, problems, samples, negs, cfg, out_dir)
        return sn.per_step_pairs(problems, negs, Q, wins, cfg), acct
    monkeypatch.setattr(sn, "generate", seeded)
    whole, acct = run(str(tmp_path / "a"))
    calls = {"n": 0}

    def dies_on_third_call(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return seeded(*args)
    os.makedirs(tmp_path / "b")
    monkeypatch.setattr(sn, "generate", dies_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "b"))
    monkeypatch.setattr(sn, "generate", seeded)
    resumed, acct_b = run(str(tmp_path / "b"))
    assert whole and resumed == whole and acct_b["rollout_tokens"] == acct["rollout_tokens"]


# Worked sample sets whose RFT positives, outcome pairs and per-step pairs can be written down by hand.
REF = "7 + 5 = 12\n12 - 3 = 9\nThe answer is 9"


def test_rft_filter_keeps_distinct_correct_samples_up_to_the_cap():
    prob = {"question": "q", "gold": "9", "response": REF}
    responses = [REF,                                        # the D_syn solution again: not a new positive
                 "7 + 5 = 12\n12 - 3 = 8\nThe answer is 8",  # wrong
                 "5 + 7 = 12\n12 - 3 = 9\nThe answer is 9",  # kept
                 "5 + 7 = 12\n12 - 3 = 9\nSo the answer is 9",  # the same equations reworded: a near-duplicate
                 "7 + 2 = 9\nThe answer is 9",               # kept (a spurious path, but right)
                 "12 - 3 = 9\nThe answer is 9",              # kept
                 "9 = 9\nThe answer is 9"]                   # right and new, but over the cap of 3
    samples = [{"responses": responses, "correct": [1, 0, 1, 1, 1, 1, 1]}]
    kept = [p["response"] for p in sn.rft_positives([prob], samples, cap=3)]
    assert kept == [responses[2], responses[4], responses[5]]
    assert [p["response"] for p in sn.rft_positives([prob], samples, cap=1)] == [responses[2]]
    # a wrong sample flagged correct=0 is never kept, whatever its text; a problem without D_syn keeps its first
    assert [p["response"] for p in sn.rft_positives([{**prob, "response": None}], samples, cap=8)] == \
        [responses[i] for i in (0, 2, 4, 5, 6)]


def test_outcome_pairs_pair_each_positive_with_its_farthest_negative():
    right = ["7 + 5 = 12\n12 - 3 = 9\nThe answer is 9", "7 + 2 = 9\nThe answer is 9"]
    wrong = ["7 + 5 = 12\n12 - 3 = 8\nThe answer is 8",           # 2 words from right[0]
             "1 + 1 = 2\n2 * 2 = 4\n4 * 4 = 16\nThe answer is 16",  # the farthest from both
             "7 + 5 = 12\nThe answer is 12"]
    samples = [{"responses": [right[0], wrong[0], right[1], wrong[1], right[0], wrong[2]], "correct": [1, 0, 1, 0, 1, 0]},
               {"responses": right, "correct": [1, 1]},                # no negative: no pair
               {"responses": wrong, "correct": [0, 0, 0]}]             # no positive: no pair
    problems = [{"question": f"q{i}", "gold": "9", "response": None} for i in range(3)]
    assert sn.word_edit_distance(right[0], wrong[0]) == 2 and sn.word_edit_distance("a b c", "a c") == 1
    pairs = sn.outcome_pairs(problems, samples, cap=4)
    x = sn.PROMPT.format(question="q0")
    assert [(p["prompt"], p["chosen"], p["rejected"], p["rejected_complete"]) for p in pairs] == \
        [(x, right[0], wrong[1], True), (x, right[1], wrong[1], True)]  # the duplicate positive counted once
    assert [p["chosen"] for p in sn.outcome_pairs(problems, samples, cap=1)] == [right[0]]


LENGTHS = [3, 1, 4, 2, 6, 5, 7, 8]  # the j-th successful rollout from a prefix has this many words before its answer


def graded_generate(model, tok, prompts, *_):
    """A scripted policy with fractional values: from a prompt whose last step holds the marker pK, the first K of
    its 8 rollouts in the batch succeed (Q = K/8), each success a different length, the shortest not first or last."""
    texts, seen = [], {}
    for p in prompts:
        j = seen[p] = seen.get(p, -1) + 1
        k = int(re.findall(r"p(\d)", p.split("Answer:\n", 1)[1])[-1])
        texts.append("w " * LENGTHS[j] + "\nThe answer is 9" if j < k else "The answer is 1")
    return texts, [len(t) for t in texts], 0


@pytest.mark.parametrize("credit,form", [("first_pit", "step"), ("min_advantage", "step"), ("first_pit", "full")])
def test_fractional_values_pits_and_pairs_by_hand(tmp_path, monkeypatch, credit, form):
    """Negative 0: Q = 7/8, 3/8, 0, (0 at the end). A_i = 3/8, -4/8, -3/8, 0 from Q_0 = 1/2, so the first pit is
    step 3 and the min-advantage step is 2. Negative 1 dies at step 1 (A = -1/2, 3/8, -3/8): chosen
    is then the shortest correct sample at x."""
    monkeypatch.setattr(sn, "generate", graded_generate)
    cfg = sn.Config(rollouts=8, credit=credit, pair_form=form)
    problems = [{"question": f"q{i}", "gold": "9", "response": None} for i in range(2)]
    neg0, neg1 = "a p7 step\nb p3 step\nc p0 step\nThe answer is 1", "z p0 bad\nstep p3 two\nThe answer is 2"
    long_right, short_right = "long correct sample here\nThe answer is 9", "short one\nThe answer is 9"
    samples = [{"responses": [neg0, long_right], "correct": [0, 1]},
               {"responses": [long_right, neg1, short_right, neg1], "correct": [1, 0, 1, 0]}]
    negs = sn.collect_negatives(problems, samples, cap=8)
    assert [n["response"] for n in negs] == [neg0, neg1]  # the repeated wrong sample counted once
    Q, wins, acct = sn.step_values(None, None, problems, samples, negs, cfg, str(tmp_path))
    assert Q[0] == [0.5, 7 / 8, 3 / 8, 0.0, 0.0] and Q[1] == [0.5, 0.0, None if credit == "first_pit" else 3 / 8, 0.0]
    assert wins[0][0] == [long_right] and wins[1][0] == [long_right, short_right]  # i = 0: the right samples at x
    assert acct["rollouts"] == 8 * (3 + 1 if credit == "first_pit" else 3 + 2)
    pairs = sn.per_step_pairs(problems, negs, Q, wins, cfg)
    x0, x1 = sn.PROMPT.format(question="q0"), sn.PROMPT.format(question="q1")
    shortest = "w \nThe answer is 9"  # LENGTHS[1] = 1 word: the second success, not the first or last
    if form == "full":  # (x, a full correct solution, y-_{1:c})
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
            (x0, long_right, "a p7 step\nb p3 step\nc p0 step\n"), (x1, short_right, "z p0 bad\n")]
    elif credit == "first_pit":
        assert [(p["prompt"], p["chosen"], p["rejected"], p["pit"]) for p in pairs] == [
            (x0 + "a p7 step\nb p3 step\n", shortest, "c p0 step\n", 3), (x1, short_right, "z p0 bad\n", 1)]
    else:
        assert [(p["prompt"], p["chosen"], p["rejected"], p["pit"]) for p in pairs] == [
            (x0 + "a p7 step\n", shortest, "b p3 step\n", 2), (x1, short_right, "z p0 bad\n", 1)]
    assert all(p["rejected_complete"] is False for p in pairs)
    assert pairs[0]["q"] == Q[0] and Q[0][0] == 0.5  # Q_0 = the k samples' success rate at x


# ----------------------------------------------------------------------------------------------------------------
# Losses, training loops, evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_dpo_loss_is_log2_at_reference_and_gradient_moves_the_right_way():
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -4.0], requires_grad=True)
    loss, cr, rr = sn.dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-6 and cr.abs().sum() == 0 and rr.abs().sum() == 0
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises log pi(chosen), lowers log pi(rejected)


def test_branched_pair_logps_equal_two_full_forwards():
    """Reading the shared prompt once and branching chosen/rejected from its KV cache gives the same log-probs and
    the same gradients as two full forwards."""
    model, tok = tiny_lm()
    pairs = [{"prompt": sn.PROMPT.format(question="Ava has 3 pens. Ava doubles them.") + "3 * 2 = 6\n",
              "chosen": "6 + 1 = 7\nThe answer is 7", "rejected": "6 + 1 = 8\n", "rejected_complete": False},
             {"prompt": sn.PROMPT.format(question="Ben has 12."), "chosen": "The answer is 12",
              "rejected": "12 - 1 = 10\nThe answer is 10", "rejected_complete": True}]
    enc = sn.pair_batches(tok, pairs)
    cfg = sn.Config()
    grads = []
    for fn in (sn.dpo_logps, sn.branched_logps):
        model.zero_grad()
        c, r = fn(model, tok, enc, cfg, "cpu")
        (c.sum() - 2 * r.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if fn is sn.dpo_logps:
            full = (c.detach(), r.detach())
    assert torch.allclose(c, full[0], atol=1e-4) and torch.allclose(r, full[1], atol=1e-4)
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_dpo_training_raises_chosen_over_rejected():
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=4, dpo_epochs=8, dpo_lr=3e-3, beta=0.5, log_every=1)
    model, tok = sn.load_model(cfg, "tiny")
    pairs = [{"prompt": "Question: 2+2?\nAnswer:\n", "chosen": "2 + 2 = 4\nThe answer is 4", "rejected": "2 + 2 = 5\n",
              "rejected_complete": False}] * 4
    enc = sn.pair_batches(tok, pairs)
    with torch.no_grad():
        c0, r0 = sn.dpo_logps(model, tok, enc, cfg, "cpu")
    log = sn.train_dpo(model, tok, pairs, cfg, "dpo-test")["log"]
    with torch.no_grad():
        c1, r1 = sn.dpo_logps(model, tok, enc, cfg, "cpu")
    assert (c1 - c0).mean() > (r1 - r0).mean() + 1.0
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and log[-1]["loss"] < math.log(2) - 0.2


def test_dpo_loss_matches_a_hand_computed_value():
    """beta 0.5; log-probs chosen (-1, -2), rejected (-3, -1); reference chosen (-2, -2), rejected (-2, -3).
    Rewards beta (pi - ref): chosen (0.5, 0), rejected (-0.5, 1); margins (1, -1);
    loss = mean(log(1 + e^-1), log(1 + e^1)); d loss / d pi(chosen)_i = -beta sigma(-margin_i) / 2."""
    pc, pr = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.0], requires_grad=True)
    loss, cr, rr = sn.dpo_loss(pc, pr, torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -3.0]), beta=0.5)
    assert abs(loss.item() - (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2) < 1e-6
    assert cr.tolist() == [0.5, 0.0] and rr.tolist() == [-0.5, 1.0]
    loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    want = [-0.5 * sig(-1) / 2, -0.5 * sig(1) / 2]
    assert torch.allclose(pc.grad, torch.tensor(want)) and torch.allclose(pr.grad, -torch.tensor(want))


def test_sft_loss_is_the_mean_nll_of_masked_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert sn.sft_loss(logps, mask).item() == pytest.approx((2 + 3 + 6) / 3)
    assert sn.sft_loss(logps, mask, torch.tensor(6.0)).item() == pytest.approx(11 / 6)  # a micro-batch's share


def response_nll(model, tok, examples):
    """Mean -log pi(token) over the response tokens (and EOS) of [{"question", "response"}], computed here from
    the model's logits directly: the reference the training loop's own masking and loss are checked against."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            p = tok(sn.PROMPT.format(question=e["question"]))["input_ids"]
            r = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            total -= sum(logp[len(p) - 1 + t, tok_id].item() for t, tok_id in enumerate(r))
            count += len(r)
    return total / count


SUMS = [{"question": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}\nThe answer is {a + b}"}
        for a, b in [(3, 4), (12, 5), (7, 7), (20, 9), (6, 15), (8, 1), (30, 2), (4, 44)]]


def test_sft_trains_on_response_tokens_only_and_lowers_their_nll():
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=8, log_every=1)
    model, tok = sn.load_model(cfg, "tiny")
    before = response_nll(model, tok, SUMS)
    log = sn.train_sft(model, tok, SUMS, cfg, 40, 1e-2, "sft-test")["log"]
    # the first step's loss is the untrained model's mean NLL over response tokens: not prompt tokens, not summed
    assert log[0]["loss"] == pytest.approx(before, abs=1e-3)
    assert response_nll(model, tok, SUMS) < before / 2 and log[-1]["loss"] < log[0]["loss"] / 2


def test_evaluation_is_greedy_and_counts_right_and_unparsable_answers(tmp_path, monkeypatch):
    problems = [{"question": f"q{i}", "gold": g, "response": None} for i, g in enumerate(["9", "0.5", "4", "7"])]
    answers = {"q0": "9 - 0 = 9\nThe answer is 9", "q1": "The answer is \\frac{1}{2}", "q2": "2 + 2 = 5\nThe answer is 5",
               "q3": "I am not sure"}
    temperatures = []

    def scripted(model, tok, prompts, temperature, *_):
        temperatures.append(temperature)
        texts = [answers[p.split("Question: ")[1].split("\n")[0]] for p in prompts]
        return texts, [1] * len(texts), 0
    monkeypatch.setattr(sn, "generate", scripted)
    cfg = sn.Config(temperature=0.9)
    result = sn.evaluate(None, None, problems, cfg, str(tmp_path / "eval.jsonl"), "eval")
    assert result == {"accuracy": 0.5, "unparsable": 1, "n_test": 4}
    assert temperatures and set(temperatures) == {0.0}  # greedy, whatever --temperature says
    assert [r["correct"] for r in sn.read_jsonl(str(tmp_path / "eval.jsonl"))] == [1, 1, 0, 0]


def test_dpo_trains_against_the_stored_reference_not_the_moving_policy():
    """The first step's loss is the DPO loss of the untrained policy against the reference log-probs the pairs
    carry; shifting the stored reference by (+2, -1) nats moves it to -log sigma(beta (-2 - 1)) exactly."""
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=4, dpo_epochs=1, dpo_lr=1e-3, beta=0.5, log_every=1)
    model, tok = sn.load_model(cfg, "tiny")
    pairs = [{"prompt": "Question: 2+2?\nAnswer:\n", "chosen": "2 + 2 = 4\nThe answer is 4", "rejected": "2 + 2 = 5\n",
              "rejected_complete": False}] * 4
    with_ref = sn.with_reference_logps(model, tok, pairs, cfg, "ref")
    with torch.no_grad():
        c, r = sn.dpo_logps(model, tok, sn.pair_batches(tok, pairs), cfg, "cpu")
    assert [p["ref_chosen_logps"] for p in with_ref] == pytest.approx(c.tolist(), abs=1e-4)
    assert [p["ref_rejected_logps"] for p in with_ref] == pytest.approx(r.tolist(), abs=1e-4)
    shifted = [{**p, "ref_chosen_logps": p["ref_chosen_logps"] + 2, "ref_rejected_logps": p["ref_rejected_logps"] - 1}
               for p in with_ref]
    log = sn.train_dpo(model, tok, shifted, cfg, "dpo-test")["log"]
    assert log[0]["loss"] == pytest.approx(math.log(1 + math.exp(1.5)), abs=1e-3)
    assert log[0]["chosen_reward"] == pytest.approx(-1.0, abs=1e-3) and log[0]["rejected_reward"] == pytest.approx(0.5, abs=1e-3)


def test_awr_weights_are_monotone_in_the_advantage_normalised_and_clipped():
    w = sn.awr_weights(torch.tensor([-1.0, 0.0, 1.0]), 0.5)
    raw = [math.exp(-4), math.exp(-2), 1.0]  # exp((A - max A) / beta)
    assert w.tolist() == pytest.approx([r / (sum(raw) / 3) for r in raw], rel=1e-5)
    adv = torch.tensor([0.3, -0.9, 0.0, 0.6, -0.2])
    w = sn.awr_weights(adv, 0.5)
    assert all((w[i] < w[j]) == (adv[i] < adv[j]) for i in range(5) for j in range(5) if i != j)
    assert w.mean().item() == pytest.approx(1.0) and not w.requires_grad
    assert sn.awr_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), 0.1, clip=3.0).max().item() == 3.0
    assert sn.awr_loss(torch.tensor([-2.0, -4.0]), torch.tensor([0.5, 1.5])).item() == pytest.approx((1 + 6) / 2)


def test_awr_moves_probability_from_the_bad_step_to_the_good_one():
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=4, log_every=100, beta_awr=0.5)
    model, tok = sn.load_model(cfg, "tiny")
    prompt = sn.PROMPT.format(question="Ava has 7 pens. Ava buys 5 more. Ava gives away 3.") + "7 + 5 = 12\n"
    good, bad = "12 - 3 = 9\n", "12 - 3 = 8\n"
    examples = [{"prompt": prompt, "response": good, "complete": False, "advantage": 0.5},
                {"prompt": prompt, "response": bad, "complete": False, "advantage": -0.5}] * 2

    def margin():
        with torch.no_grad():
            enc = [sn.encode(tok, prompt, r, complete=False) for r in (good, bad)]
            g, b = sn.sequence_logps(model, *sn.batch_tensors(tok, enc, 256, "cpu")[:3]).tolist()
        return g - b
    before = margin()
    sn.train_sft(model, tok, examples, cfg, 60, 1e-2, "awr-test")
    # AWR imitates both steps, weighted e^{+1} : e^{-1}: the margin heads for log(e^2) = 2 nats
    assert margin() > before + 1.0


def test_awr_examples_read_the_rollouts_as_step_advantages(tmp_path, monkeypatch):
    """Negative 0 of the fractional fixture: Q_0 = 1/2, Q = 7/8, 3/8, 0, 0 -> A = 3/8, -1/2, -3/8, 0 (the answer line
    after the pit changes nothing); the pair's chosen continuation from x + y_1 + y_2: A = 1 - 3/8."""
    monkeypatch.setattr(sn, "generate", graded_generate)
    cfg = sn.Config(rollouts=8)
    problems = [{"question": "q0", "gold": "9", "response": None}]
    neg = "a p7 step\nb p3 step\nc p0 step\nThe answer is 1"
    samples = [{"responses": [neg, "right\nThe answer is 9"], "correct": [0, 1]}]
    negs = sn.collect_negatives(problems, samples, cap=8)
    Q, wins, _ = sn.step_values(None, None, problems, samples, negs, cfg, str(tmp_path))
    ex = sn.awr_examples(problems, negs, Q, wins, cfg)
    x = sn.PROMPT.format(question="q0")
    assert [(e["prompt"], e["response"], e["complete"], e["advantage"]) for e in ex] == [
        (x, "a p7 step\n", False, 3 / 8), (x + "a p7 step\n", "b p3 step\n", False, -1 / 2),
        (x + "a p7 step\nb p3 step\n", "c p0 step\n", False, -3 / 8),
        (x + "a p7 step\nb p3 step\nc p0 step\n", "The answer is 1", True, 0.0),
        (x + "a p7 step\nb p3 step\n", "w \nThe answer is 9", True, 5 / 8)]
    # --value bok (K = 5): V = 1 - (1/2)^5 (x: 2 samples, the plug-in), 1 (7 of 8), 55/56 (3 of 8), 0, 0
    bok = sn.awr_examples(problems, negs, Q, wins, dataclasses.replace(cfg, value="bok", k_samples=2))
    assert [e["advantage"] for e in bok] == pytest.approx([1 / 32, -1 / 56, -55 / 56, 0.0, 1 / 56])


def test_the_audit_flags_a_planted_spurious_step_in_a_correct_sample(tmp_path, monkeypatch):
    """A correct sample whose second step kills its prefix (p0: no rollout finishes) and whose third revives it (p8):
    A = 7/8 - 1/2, -7/8, +1, 0 -> only step 2 is flagged; a clean correct sample (p7, p6) is not."""
    monkeypatch.setattr(sn, "generate", graded_generate)
    monkeypatch.setattr(sn, "load_model", lambda cfg, path: (None, None))
    problems = [{"question": "q0", "gold": "9", "response": None}]
    spurious, clean = "a p7 step\nb p0 slip\nc p8 mend\nThe answer is 9", "d p7 first\nb p6 step\nThe answer is 9"
    samples = [{"question": "q0", "gold": "9", "responses": [spurious, clean, "x\nThe answer is 1", clean],
                "correct": [1, 1, 0, 1]}]
    out = str(tmp_path / "run")
    cfg = sn.Config(out=out, rollouts=8, audit=5)
    os.makedirs(f"{out}/samples")
    sn.write_jsonl(f"{out}/samples/samples.jsonl", samples)
    sn.finish_stage(cfg, "samples", {})
    res = sn.run_audit(cfg, problems, "unused")
    rows = sn.read_jsonl(f"{out}/audit/steps.jsonl")
    assert [(r["nid"], r["step"], r["advantage"], r["flagged"]) for r in rows] == [
        (0, 1, 7 / 8 - 3 / 4, False), (0, 2, -7 / 8, True), (0, 3, 1.0, False), (0, 4, 0.0, False),
        (1, 1, 7 / 8 - 3 / 4, False), (1, 2, -1 / 8, False), (1, 3, 2 / 8, False)]
    assert (res["audited"], res["flagged_samples"], res["flagged_steps"]) == (2, 1, 1)
    assert res["with_a_wrong_step"] == 0 and res["precision"] == 0.0  # "q0" has no truth: nothing is wrong by it


def test_pass_at_k_and_majority_vote_on_scripted_samples(tmp_path, monkeypatch):
    """Four problems, four samples each: pass@4 = 3/4 (the last has no right sample); maj@4 = 2/4 (problem 1's vote
    ties three ways and goes to the first answer, 1; problem 2's \\frac12 and 0.5 are one answer, beating 3 and 3)."""
    problems = [{"question": f"q{i}", "gold": g, "response": None} for i, g in enumerate(["9", "2", "0.5", "4"])]
    draws = {"q0": ["9", "8", "9", "7"], "q1": ["1", "2", "3", None], "q2": ["\\frac12", "3", "0.5", "3"],
             "q3": [None, "5", None, "6"]}

    def scripted(model, tok, prompts, temperature, *_):
        texts, seen = [], {}
        for p in prompts:
            q = p.split("Question: ")[1].split("\n")[0]
            j = seen[q] = seen.get(q, -1) + 1
            a = draws[q][j % 4] if temperature > 0 else draws[q][0]
            texts.append("no answer" if a is None else f"The answer is {a}")
        return texts, [1] * len(texts), 0
    monkeypatch.setattr(sn, "generate", scripted)
    result = sn.evaluate(None, None, problems, sn.Config(eval_k=4), str(tmp_path / "eval.jsonl"), "eval")
    assert result == {"accuracy": 0.5, "unparsable": 1, "n_test": 4, "pass@4": 0.75, "maj@4": 0.5}
    assert [r["majority"] for r in sn.read_jsonl(str(tmp_path / "eval.jsonl"))] == ["9", "1", "\\frac12", "5"]
    assert sn.pass_at_k(4, 1, 1) == pytest.approx(0.25) and sn.pass_at_k(4, 1, 4) == 1.0 and sn.pass_at_k(4, 0, 2) == 0
    assert sn.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)


# ----------------------------------------------------------------------------------------------------------------
# Whole runs on a miniature config
# ----------------------------------------------------------------------------------------------------------------

MINI = ["--task", "arith", "--train", os.path.join(HERE, "data/arith/train.jsonl"), "--test", os.path.join(HERE, "data/arith/test.jsonl"), "--n_train", "12", "--n_test", "6", "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--sft_epochs", "1",
        "--k_samples", "2", "--max_new_tokens", "16", "--rollouts", "2", "--batch_size", "8", "--dpo_epochs", "1"]


def test_every_mode_runs_on_a_miniature_config(tmp_path):
    out = str(tmp_path / "run")
    for mode in ["sft", "rft", "dpo", "per_step", "eval"]:
        sn.main(MINI + ["--mode", mode, "--out", out])
    for f in ["sft/model/config.json", "samples/samples.jsonl", "rft/positives.jsonl", "dpo/pairs.jsonl",
              "per_step/pairs.jsonl", "per_step/model/config.json", "eval_sft/responses.jsonl", "metrics.jsonl",
              "summary.md"]:
        assert os.path.exists(os.path.join(out, f)), f
    stages = [json.loads(line)["stage"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert stages.count("sft") == 1  # later modes reused the finished SFT stage instead of redoing it
    both = str(tmp_path / "both")
    sn.main(MINI + ["--mode", "per_step", "--loss", "both", "--eval_k", "2", "--out", both])
    table = open(os.path.join(both, "summary.md")).read()
    assert "| per_step |" in table and "| per_step_awr |" in table and "pass@2" in table and "maj@2" in table
    rollouts = sn.read_jsonl(os.path.join(both, "per_step/rollouts.jsonl"))
    assert sn.stage_done(sn.Config(out=both), "per_step_awr")["rollouts"] == sn.stage_done(sn.Config(out=both), "per_step")["rollouts"]
    assert len(rollouts) == sn.stage_done(sn.Config(out=both), "per_step")["rollouts"]  # AWR made none of its own
    assert all("pass@2" in sn.stage_done(sn.Config(out=both), f"eval_{s}") for s in ("sft", "per_step", "per_step_awr"))


def test_bigstep_learner_starts_from_one_cached_base(tmp_path, monkeypatch):
    out, loaded, trained = str(tmp_path / "run"), [], []
    load, train = sn.load_model, sn.train_sft
    monkeypatch.setattr(sn, "load_model", lambda cfg, path: loaded.append(path) or load(cfg, path))
    monkeypatch.setattr(sn, "train_sft", lambda m, t, ex, cfg, *a, **k: trained.append((a[2], cfg.sft_steps, ex[:2]))
                        or train(m, t, ex, cfg, *a, **k))
    big = MINI[2:] + ["--base_steps", "3", "--out", out]  # the default task, bigstep; MINI's arith data stand in
    sn.main(big + ["--mode", "rft"])
    base = f"{out}/base/model"
    assert loaded[:2] == ["tiny", base] and loaded.count(base) == 2 and loaded.count("tiny") == 1  # SFT, RFT from it
    assert [(d, s) for d, s, _ in trained] == [("base", 3), ("sft", 0), ("rft", 0)]
    assert all(e["question"].startswith("Compute ") for e in trained[0][2])
    first = sn.load_model(sn.Config(), base)[0].state_dict()
    loaded.clear(), trained.clear()
    sn.main(big + ["--mode", "per_step"])  # the base, SFT and samples are reused
    assert "tiny" not in loaded and [d for d, _, _ in trained] == [] and sn.stage_done(sn.Config(out=out), "base")
    assert all(torch.equal(v, sn.load_model(sn.Config(), base)[0].state_dict()[k]) for k, v in first.items())
    sn.main(MINI + ["--mode", "sft", "--out", str(tmp_path / "arith")])
    assert not os.path.exists(tmp_path / "arith" / "base")  # the first toy learns from scratch, as before
    seed1 = big[:-1] + [str(tmp_path / "seed1"), "--seed", "1", "--mode", "sft"]
    sn.main(seed1)  # another seed: its own SFT, the same base (--base_seed), as every seed starts from one LLM
    other = sn.load_model(sn.Config(), f"{tmp_path}/seed1/base/model")[0].state_dict()
    assert all(torch.allclose(v, other[k], rtol=1e-5, atol=1e-7) for k, v in first.items())  # up to float noise
    sn.main(seed1[:-2] + ["--base_seed", "1", "--out", str(tmp_path / "base1"), "--mode", "sft"])
    other = sn.load_model(sn.Config(), f"{tmp_path}/base1/base/model")[0].state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in first.items())  # the flag is what decides it
    trained.clear()
    sn.main(big[:-1] + [str(tmp_path / "scaling"), "--mode", "scaling", "--n_train", "4", "--doublings", "1",
                        "--seeds", "2", "--val", "0", "--sft_steps", "2"])
    assert [d for d, _, _ in trained].count("base") == 1 and os.path.exists(tmp_path / "scaling" / "base" / "model")
    assert not any(os.path.exists(tmp_path / "scaling" / f"seed{s}" / "base") for s in (0, 1))  # one base, all seeds


def test_the_shipped_base_is_used_checked_and_holds_the_arithmetic(tmp_path, monkeypatch):
    """data/bigstep/base is the default base: loaded, not trained; it answers fresh operation lists as base.json says
    (README: "The embedded task"); other settings train their own; a damaged copy stops with a clear error."""
    monkeypatch.chdir(HERE)
    info = json.load(open("data/bigstep/base/base.json"))
    assert info["settings"] == {k: getattr(sn.Config, k) for k in sn.BASE_KEYS}  # made with today's defaults
    monkeypatch.setattr(sn, "train_sft", lambda *a, **k: pytest.fail("the shipped base must not be trained again"))
    cfg = sn.run_base(sn.Config(out=str(tmp_path / "run")))
    assert cfg.model == sn.SHIPPED_BASE["bigstep"] and not os.path.exists(tmp_path / "run" / "base")
    model, tok = sn.load_model(sn.Config(), cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 526_848  # width 96, 4 layers: the README's 0.53M
    skill = sn.base_skill(model, tok, sn.Config())                  # base.json's 1,000 fresh lists, greedily (2 s)
    assert info["fresh_lists_right"] >= 0.95 and abs(skill - info["fresh_lists_right"]) <= 0.01  # another host: a tie
    for other in ({"d_model": 64}, {"base_steps": 1000}, {"base_seed": 1}, {"lr": 1e-3}):
        assert not sn.shipped_base_fits(sn.Config(**other))          # these train a base of their own, as before
    # damaged copies: every one stops, naming the file and the command that rebuilds it
    copy = tmp_path / "base"
    monkeypatch.setitem(sn.SHIPPED_BASE, "bigstep", str(copy))

    def fresh():
        import shutil
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree("data/bigstep/base", copy)
    fresh()
    assert sn.shipped_base_fits(sn.Config())
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])                      # truncated
    with pytest.raises(SystemExit, match=rf"{weights}: damaged .*--mode make_data"):
        sn.run_base(sn.Config())
    fresh()
    (copy / "tokenizer.json").unlink()                                        # missing
    with pytest.raises(SystemExit, match=r"tokenizer.json: missing .*--mode make_data"):
        sn.run_base(sn.Config())
    fresh()
    (copy / "base.json").unlink()
    with pytest.raises(SystemExit, match=r"base.json: missing.*--mode make_data"):
        sn.run_base(sn.Config())
    # weights of another shape, with a base.json that vouches for them: the load itself refuses
    fresh()
    narrow, _ = sn.load_model(sn.Config(d_model=64), "tiny")
    narrow.save_pretrained(str(tmp_path / "narrow"))
    weights.write_bytes((tmp_path / "narrow" / "model.safetensors").read_bytes())
    manifest = json.load(open(copy / "base.json"))
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size, "sha256": sn.sha256(str(weights))}
    (copy / "base.json").write_text(json.dumps(manifest))
    path = sn.run_base(sn.Config()).model
    with pytest.raises(SystemExit, match=rf"{copy}: not a loadable model folder .*--mode make_data"):
        sn.load_model(sn.Config(), path)
    from safetensors.torch import load_file, save_file                        # a tensor missing: never random weights
    fresh()
    tensors = load_file(str(weights))
    tensors.pop("model.layers.0.mlp.down_proj.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"lack 1 of the model's tensors \(model.layers.0.mlp.down_proj.weight"):
        sn.load_model(sn.Config(), str(copy))


def test_seeds_run_each_seed_into_its_folder_and_print_one_paired_table(tmp_path, capsys):
    out = str(tmp_path / "run")
    cmd = MINI + ["--mode", "dpo", "--seeds", "2", "--seed", "3", "--out", out]
    sn.main(cmd)
    table = open(f"{out}/seeds.md").read()
    assert table in capsys.readouterr().out
    right = {(s, n): [r["correct"] for r in sn.read_jsonl(f"{out}/seed{s}/eval_{n}/responses.jsonl")]
             for s in (3, 4) for n in ("sft", "dpo")}
    accs = [100 * sum(right[s, "dpo"]) / 6 for s in (3, 4)]
    mean = sum(accs) / 2
    sd = abs(accs[0] - accs[1]) / 2 ** 0.5
    row = f"| dpo | {accs[0]:.1f} | {accs[1]:.1f} | {mean:.1f} ± {sd:.1f} | {2 * sd / 2 ** 0.5:.1f} |"
    assert "| stage | seed 3 | seed 4 | mean ± sd | ± 2 SE |" in table and row in table
    d = [a - b for a, b in zip(right[3, "dpo"], right[3, "sft"])]  # seed 3's paired difference, by hand
    m = sum(d) / 6
    se = (sum((x - m) ** 2 for x in d) / 5 / 6) ** 0.5
    assert f"| dpo | {100 * m:+.1f} ± {200 * se:.1f} | " in table
    metrics = open(f"{out}/seed3/metrics.jsonl").read()
    assert sn.stage_done(sn.Config(out=f"{out}/seed4"), "dpo") and not os.path.exists(f"{out}/sft")
    sn.main(cmd)  # run again: every stage of every seed is reused, the same table comes out
    assert open(f"{out}/seed3/metrics.jsonl").read() == metrics and open(f"{out}/seeds.md").read() == table
    with pytest.raises(SystemExit):
        sn.parse_config(MINI + ["--mode", "eval", "--seeds", "2"])
    assert sn.parse_config(MINI + ["--mode", "scaling"]).seeds == 3 and sn.parse_config(MINI).seeds == 1


def test_val_keeps_the_best_checkpoint_on_held_out_problems(tmp_path, monkeypatch):
    out, seen, snapshots = str(tmp_path / "run"), [], []
    scores = iter([0.1, 0.5, 0.3, 0.5, 0.2] + [0.0] * 20)  # best: the 2nd evaluation (the first of two 0.5s)
    run_eval = sn.evaluate

    def scripted(model, tok, problems, cfg, path, desc):
        if "validation" not in desc:
            return run_eval(model, tok, problems, cfg, path, desc)
        seen.append([p["question"] for p in problems])
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scores)}
    monkeypatch.setattr(sn, "evaluate", scripted)
    sn.main(MINI + ["--mode", "sft", "--val", "5", "--sft_steps", "10", "--out", out])
    held = [p["question"] for p in sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"))[-5:]]
    assert len(seen) == 10 and all(q == held for q in seen)  # 16 a run, at most one a step; the file's last 5
    res = sn.stage_done(sn.Config(out=out), "sft")
    assert (res["best_step"], res["best_val"]) == (2, 0.5) and [r["step"] for r in res["val_log"]] == list(range(1, 11))
    final = sn.load_model(sn.Config(), f"{out}/sft/model")[0].state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)        # the model is the best step's
    assert not all(torch.equal(final[k], snapshots[-1][k]) for k in final)   # not the last one
    assert not os.path.exists(f"{out}/sft/best.pt")
    with pytest.raises(SystemExit, match="--val 7995 needs 8007 problems"):
        sn.main(MINI + ["--mode", "sft", "--val", "7995", "--out", out + "2"])
    def half(model, tok, problems, cfg, path, desc):  # test: one of two right; validation: all 0.0 from here on
        if "validation" in desc:
            return {"accuracy": next(scores)}
        sn.write_jsonl(path, [{"correct": 1}, {"correct": 0}])
        return {"accuracy": 0.5, "unparsable": 0, "n_test": 2}
    monkeypatch.setattr(sn, "evaluate", half)  # the first step is best
    sn.main(MINI + ["--mode", "scaling", "--n_train", "4", "--doublings", "1", "--seeds", "1", "--val", "3",
                    "--sft_steps", "2", "--out", out + "3"])
    assert "- seed 0: best validation step of SFT on 4: 1 of 2, 8: 1 of 2; RFT on 4: 1" in open(out + "3/scaling.md").read()


def test_scripted_policy_run_builds_pairs_and_trains(tmp_path, monkeypatch):
    """The whole per-step chain with a policy that is right half the time, so negatives, pits and pairs exist."""
    gold = {p["question"]: p["gold"] for p in sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"), 12)}
    gold.update({p["question"]: p["gold"] for p in sn.load_problems(os.path.join(HERE, "data/arith/test.jsonl"), 6)})
    calls = {"n": 0}

    def half_right(model, tok, prompts, temperature, max_new, seed):
        texts = []
        for p in prompts:
            calls["n"] += 1
            answer = gold[p.split("Question: ")[1].split("\nAnswer:")[0]]
            texts.append(f"1 + 1 = 2\nThe answer is {answer}" if calls["n"] % 3 else "1 + 1 = 3\nThe answer is -1")
        return texts, [1] * len(texts), 0
    monkeypatch.setattr(sn, "generate", half_right)
    out = str(tmp_path / "run")
    sn.main(MINI + ["--mode", "all", "--out", out, "--sort_len", "true", "--gen_tokens", "3000"])
    pairs = sn.read_jsonl(os.path.join(out, "per_step/pairs.jsonl"))
    tok = sn.tiny_tokenizer()  # EOS ends chosen (a complete solution), never a rejected partial step
    assert pairs and all(c[1][-1] == tok.eos_token_id != r[1][-1] for c, r in sn.pair_batches(tok, pairs))
    assert all(p["ref_chosen_logps"] < 0 and p["ref_rejected_logps"] < 0 for p in pairs)  # pi_sft's, stored with them
    assert sn.read_jsonl(os.path.join(out, "dpo/pairs.jsonl"))
    assert "| per_step |" in open(os.path.join(out, "summary.md")).read()
    example, pick = open(os.path.join(out, "per_step/example.md")).read(), next(p for p in pairs if p["pit"] >= 2)
    question = sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"), 12)[pick["pid"]]["question"]
    assert example.startswith(f"Question: {question}") and f"Pit: step {pick['pit']}, the first prefix" in example
    assert "The task's truth: the first wrong step is step 1." in example  # "1 + 1 = 3" starts from no question's value
    assert f"- rejected: {pick['rejected'].strip()}" in example and "(8/8)" not in example  # M = 2 rollouts here
    assert re.search(r"\| x \+ y_1 \| 1 \+ 1 = 3 \| \d\.\d\d \(\d/2\) \|", example)


def test_changed_setting_against_existing_folder_is_refused(tmp_path):
    out = str(tmp_path / "run")
    sn.main(MINI + ["--mode", "sft", "--out", out])
    with pytest.raises(SystemExit) as e:
        sn.main(MINI + ["--mode", "sft", "--out", out, "--lr", "0.1"])
    assert "--lr" in str(e.value)


def test_real_model_path_loads_a_saved_model(tmp_path):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2)
    model, tok = sn.load_model(cfg, "tiny")
    sn.save_model(model, tok, str(tmp_path / "my-model"))
    out = str(tmp_path / "run")
    sn.main(MINI + ["--mode", "sft", "--model", str(tmp_path / "my-model"), "--out", out])
    sn.main(MINI + ["--mode", "eval", "--init", str(tmp_path / "my-model"), "--out", out + "-eval"])
    assert os.path.exists(os.path.join(out, "sft/model/model.safetensors"))
    assert os.path.exists(os.path.join(out + "-eval", "eval_init/responses.jsonl"))


def test_resumed_sampling_matches_uninterrupted(tmp_path):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, gen_batch=4, max_new_tokens=8)
    model, tok = sn.load_model(cfg, "tiny")
    rows = [(str(i), f"Question: {i}\nAnswer:\n") for i in range(10)]
    full, _ = sn.cached_generate(model, tok, rows, cfg, str(tmp_path / "a.jsonl"), 0, "a")
    sn.cached_generate(model, tok, rows[:4], cfg, str(tmp_path / "b.jsonl"), 0, "b")  # "killed" after batch 0
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"key": "4", "te')  # and a torn line from the crash
    resumed, _ = sn.cached_generate(model, tok, rows, cfg, str(tmp_path / "b.jsonl"), 0, "b")
    assert resumed == full


def test_command_line_bad_input_is_one_clear_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    with pytest.raises(SystemExit) as e:
        sn.main(["--mode", "sft", "--train", str(f), "--out", str(tmp_path / "run")])
    assert str(e.value) == f"error: {f}, line 2: field 'answer' is missing or not a non-empty string (read as plain format)"


# ----------------------------------------------------------------------------------------------------------------
# The scaling measurement
# ----------------------------------------------------------------------------------------------------------------


def test_log_curve_fit_and_equivalent_size_recover_a_known_curve():
    sizes = [100, 200, 400, 800]
    a, b = sn.fit_log_curve(sizes, [0.9 - 0.1 * math.log(m) for m in sizes])
    assert abs(a - 0.9) < 1e-9 and abs(b + 0.1) < 1e-9
    assert abs(sn.equivalent_size(0.9 - 0.1 * math.log(800), a, b) - 800) < 1e-6
    assert abs(sn.equivalent_size(0.9 - 0.1 * math.log(3200), a, b) - 3200) < 1e-6   # extrapolates past 8n
    assert sn.equivalent_size(0.5, 0.4, 0.01) is None                               # SFT not improving: no size


def test_scaling_mode_reports_the_multipliers_of_synthetic_curves(tmp_path, monkeypatch):
    """A miniature scaling run whose evaluation is replaced by a known curve: SFT accuracy = 0.1 + 0.1 ln(m/n) on m
    problems; RFT scores what SFT scores on 2n, per-step on 8n, budget-matched RFT on 4n, outcome DPO on n."""
    n = 4
    at = {"rft": 2, "per_step": 8, "dpo": 1}

    def fake_evaluate(model, tok, problems, cfg, path, desc):  # 10,000 test problems, the first k right
        name = desc.split()[-1]
        times = 4 if "rft_budget" in cfg.out and name == "rft" else at.get(name, cfg.n_train / n)
        k = round(10_000 * (0.1 + 0.1 * math.log(times)))
        sn.write_jsonl(path, [{"correct": int(i < k)} for i in range(10_000)])
        return {"accuracy": k / 10_000, "unparsable": 0, "n_test": 10_000}
    monkeypatch.setattr(sn, "evaluate", fake_evaluate)
    out = str(tmp_path / "scaling")
    cfg, train, test = scaling_args(n, out)
    rows, credit = sn.run_scaling(dataclasses.replace(cfg, loss="both"), train, test)
    got = {(r["seed"], r["method"]): r for r in rows}
    assert {s for s, _ in got} == {0, 1} and len(credit) == 2
    for seed in (0, 1):
        mult = {m: got[seed, m]["multiplier"] for m in ("sft", "sft_8", "sft_16", "rft", "rft_budget", "dpo", "per_step",
                                                        "per_step_oracle")}
        assert mult == {"sft": 1.0, "sft_8": 2.0, "sft_16": 4.0, "rft": 2.0, "rft_budget": 4.0, "dpo": 1.0, "per_step": None,
                        "per_step_oracle": 1.0}  # per-step's n' is 8n, past the largest size measured (4n): no number
        assert got[seed, "per_step"]["fit_multiplier"] == 8.0
        brackets = {m: sn.bracket_text(got[seed, m]["beats"], got[seed, m]["trails"], n) for m in ("rft", "rft_budget", "dpo", "per_step")}
        assert brackets == {"rft": "1-2x", "rft_budget": "2-4x", "dpo": "< 1x", "per_step": "> 4x"}
        assert got[seed, "per_step_awr"]["rollouts"] == got[seed, "per_step"]["rollouts"]  # the same rollouts
        assert got[seed, "per_step"]["samples"] == n * 2 and got[seed, "sft_16"]["problems"] == 16
        assert got[seed, "rft_budget"]["samples"] >= got[seed, "rft"]["samples"]
        assert got[seed, "rft"]["tokens_trained"] > got[seed, "sft"]["tokens_trained"]
    table = open(os.path.join(out, "scaling.md")).read()
    assert "| per_step | 4 | 0.308 ± 0 | > 4x / > 4x | > 4x | > 4x, past the range / > 4x, past the range | n/a (2 of 2 outside) |" in table
    assert "| rft | 4 | 0.169 ± 0 | 1-2x / 1-2x | 1-2x | 2.00 / 2.00 | 2 ± 0 |" in table
    assert "- rft: seed 0 beats SFT on 4 (+6.9 ± 0.5), not SFT on 8 (+0.0 ± 0.0);" in table
    assert [json.loads(x)["stage"] for x in open(os.path.join(out, "metrics.jsonl"))].count("scaling") == 18
    # the picture: well-formed, each point where its numbers put it on a log axis
    import xml.etree.ElementTree as ET
    svg = ET.parse(os.path.join(out, "scaling.svg")).getroot()
    circles = [c.attrib for c in svg.iter("{http://www.w3.org/2000/svg}circle")]
    sft_x = {r["problems"]: float(c["cx"]) for c in circles if c.get("data-method", "").startswith("sft")
             for r in rows if r["method"] == c["data-method"]}
    mean_pt = {c["data-method"]: c for c in circles if "data-error" in c}
    ring = {c["data-method"]: c for c in circles if "data-equivalent" in c}
    assert set(mean_pt) == {"rft", "dpo", "per_step", "per_step_awr", "rft_budget", "per_step_oracle"} and len(sft_x) == 3
    assert float(ring["rft"]["cx"]) == pytest.approx(sft_x[8], abs=0.1)        # RFT on n is worth SFT on 2n
    assert float(ring["rft_budget"]["cx"]) == pytest.approx(sft_x[16], abs=0.1)
    step = sft_x[8] - sft_x[4]                                                   # one doubling, on a log axis
    assert sft_x[16] - sft_x[8] == pytest.approx(step, abs=0.2)
    assert "per_step" not in ring  # 8n is past the last SFT size: an arrow at the edge, no ring off the line
    arrow = next(p.attrib for p in svg.iter("{http://www.w3.org/2000/svg}path") if p.get("data-method") == "per_step")
    assert float(arrow["d"][1:].split(",")[0]) == pytest.approx(sft_x[16], abs=0.1) and arrow["data-outside"] == "32"
    assert float(mean_pt["per_step"]["cx"]) == pytest.approx(sft_x[4], abs=0.1)
    assert float(mean_pt["rft_budget"]["cy"]) == pytest.approx(float(ring["rft_budget"]["cy"]))
    assert float(mean_pt["per_step"]["cy"]) > float(mean_pt["rft"]["cy"]) > float(mean_pt["dpo"]["cy"])  # less error, lower
    steps = [sn.stage_done(sn.Config(out=f"{out}/seed0/{d}"), s)["log"][-1]["step"]
             for d, s in [("n4", "sft"), ("n16", "sft"), ("n4", "rft"), ("rft_budget", "rft")]]
    assert steps == [2, 2, 2, 2]  # compute-matched: every SFT and RFT the same number of optimizer steps
    # --size_epochs: each size its own epochs (RFT and the DPOs on n take n's), the chosen steps reported against them
    out2 = str(tmp_path / "epochs")
    sn.run_scaling(dataclasses.replace(cfg, out=out2, seeds=1, sft_steps=0, size_epochs="1,3,2"), train, test)
    trained = {d: sn.stage_done(sn.Config(out=f"{out2}/seed0/{d}"), "sft")["log"][-1]["step"] for d in ("n4", "n8", "n16")}
    assert trained == {"n4": 1, "n8": 3, "n16": 4}  # batch 8: 1, 1 and 2 steps an epoch
    assert [json.load(open(f"{out2}/seed0/{d}/config.json"))["sft_epochs"] for d in ("n4", "rft_budget")] == [1, 1]


def test_first_wrong_step_is_the_toy_truth():
    q = "Mia has 7 pens. Mia buys 5 more. Mia gives away 3. Mia doubles them. How many pens now?"
    assert sn.toy_chain(q) == (7, [("+", 5), ("-", 3), ("*", 2)])
    assert sn.toy_chain("What is 2 + 2?") is None
    wrong = lambda text: sn.first_wrong_step(sn.split_steps(text), q)  # noqa: E731
    assert wrong("7 + 5 = 12\n12 - 3 = 9\n9 * 2 = 18\nThe answer is 18") is None
    assert wrong("7 + 5 - 3 = 9\n9 * 2 = 18\nThe answer is 18") is None              # a big step, taken right
    assert wrong("7 + 5 - 3 = 10\n10 * 2 = 20\nThe answer is 20") == 1               # a big step, taken wrong
    assert wrong("7 + 5 = 12\n12 - 3 * 2 = 18\nThe answer is 18") == 2   # only +/- runs share a line (12 - 6)
    assert wrong("7 + 5 = 12\n12 * 2 = 24\n24 - 3 = 21\nThe answer is 21") == 2     # out of order
    assert wrong("7 + 5 = 12\n12 - 3 = 8\n8 * 2 = 16\nThe answer is 16") == 2
    assert wrong("7 + 5 = 11\n11 - 3 = 8\n8 * 2 = 16\nThe answer is 18") == 1       # right answer, wrong step
    assert wrong("7 + 5 = 12\n12 - 3 = 9\n9 * 2 = 18\n18 + 0 = 18\nThe answer is 18") == 4
    assert wrong("7 + 5 = 12\n12 - 3 = 9\n9 * 2 = 18\nThe answer is 9") == 4        # the answer line counts
    assert wrong("7 + 5 = 12\n") == 2                                                  # stops short: past the end
    assert sn.exact_rest(q, ["7 + 5 - 3 = 9\n"]) == "9 * 2 = 18\nThe answer is 18"
    assert sn.has_toy_truth(sn.load_problems(f"{HERE}/data/arith/train.jsonl", 200))
    assert sn.has_toy_truth(sn.load_problems(f"{HERE}/data/bigstep/train.jsonl", 200))


def test_oracle_pairs_put_the_pit_on_the_true_first_wrong_step():
    prob = {"question": "Mia has 7 pens. Mia buys 5 more. Mia gives away 3. How many pens now?", "gold": "9",
            "response": "7 + 5 = 12\n12 - 3 = 9\nThe answer is 9"}
    wrong = ["7 + 5 = 12\n12 - 3 = 8\nThe answer is 8", "7 + 5 = 11\n11 - 3 = 8\nThe answer is 8",
             "7 + 5 = 12\n12 - 3 = 9\n9 + 1 = 10\nThe answer is 10", "7 + 5 = 12\n"]  # the last, cut short, has no wrong step
    samples = [{"responses": wrong + [prob["response"]], "correct": [False] * 4 + [True]}]
    pairs = sn.oracle_pairs([prob], samples, sn.Config(max_negatives=4))
    x = sn.PROMPT.format(question=prob["question"])
    assert [(p["prompt"], p["chosen"], p["rejected"], p["pit"]) for p in pairs] == [
        (x + "7 + 5 = 12\n", "12 - 3 = 9\nThe answer is 9", "12 - 3 = 8\n", 2),
        (x, prob["response"], "7 + 5 = 11\n", 1),
        (x + "7 + 5 = 12\n12 - 3 = 9\n", "The answer is 9", "9 + 1 = 10\n", 3)]


def scores(accuracies, n=1000):
    """0/1 scores on n test problems with these accuracies, nested (a better model also solves what a worse one does)."""
    return [[int(i < round(a * n)) for i in range(n)] for a in accuracies]


@pytest.mark.parametrize("sft,method,reading", [
    ([0.37, 0.38, 0.38, 0.38], 0.44, "> 8x"),      # a flat curve: beats every size; the fit would say thousands
    ([0.30, 0.33, 0.37, 0.48], 0.45, "4-8x"),      # bending up
    ([0.30, 0.40, 0.45, 0.47], 0.46, "4-8x"),      # bending down
    ([0.30, 0.35, 0.40, 0.45], 0.25, "< 1x"),      # worse than SFT on n
    ([0.30, 0.35, 0.40, 0.45], 0.35, "1-2x"),      # a tie is not a win
    ([0.30, 0.40, 0.35, 0.45], 0.38, "4x, not 2x"),  # SFT's curve dips: both ends said
])
def test_bracket_reads_the_test_accuracies_of_synthetic_curves(sft, method, reading):
    sizes = [100, 200, 400, 800]
    curve = dict(zip(sizes, scores(sft)))
    beats, trails = sn.bracket(scores([method])[0], curve)
    assert sn.bracket_text(beats, trails, 100) == reading
    if beats:  # the difference and its standard error, by hand: nested scores differ on |a - b| of the problems
        d = method - dict(zip(sizes, sft))[beats[0]]
        assert beats[1] == pytest.approx(d, abs=1e-9) and beats[2] == pytest.approx((d * (1 - d) / 999) ** 0.5, rel=1e-6)
    a, b = sn.fit_log_curve(sizes, [1 - s for s in sft])
    eq = sn.equivalent_size(1 - method, a, b)
    row = {"multiplier": round(eq / 100, 2) if eq and 100 <= eq <= 800 else None, "fit_multiplier": eq and eq / 100}
    text = sn.fit_text(row, sizes)
    assert text == {"> 8x": "> 8x, past the range", "< 1x": "< 1x, below the range"}.get(reading, text)
    if reading == "4-8x":
        assert 4 <= float(text) <= 8


def test_the_picture_stays_legible_whatever_the_numbers():
    """The extreme case of a flat SFT curve (the fit reads per-step at thousands of times the data): the axis keeps to
    the measured sizes, the method's n' becomes an arrow at the edge, the legend fits, no labels overlap."""
    import xml.etree.ElementTree as ET
    sizes, rows = [960, 1920, 3840, 7680], []
    sft_acc = [0.328, 0.376, 0.384, 0.378]
    a, b = sn.fit_log_curve(sizes, [1 - x for x in sft_acc])
    for m, acc in zip(sizes, sft_acc):
        rows.append({"seed": 0, "method": "sft" if m == 960 else f"sft_{m}", "problems": m, "accuracy": acc,
                     "sft_equivalent_problems": None, "fit_a": a, "fit_b": b})
    for method, acc in [("rft", 0.422), ("dpo", 0.434), ("per_step", 0.544), ("per_step_oracle", 0.586),
                        ("rft_budget", 0.30)]:
        eq = sn.equivalent_size(1 - acc, a, b)
        rows.append({"seed": 0, "method": method, "problems": 960, "accuracy": acc, "sft_equivalent_problems": eq,
                     "fit_a": a, "fit_b": b})
    assert sn.equivalent_size(1 - 0.544, a, b) / 960 > 1000  # the absurd reading this guards against
    pooled = {r["method"]: sn.bracket(scores([r["accuracy"]])[0], dict(zip(sizes, scores(sft_acc))))
              for r in rows if not r["method"].startswith("sft")}
    svg = ET.fromstring(sn.scaling_svg(rows, sizes, pooled))
    W, H = float(svg.get("width")), float(svg.get("height"))
    ns = "{http://www.w3.org/2000/svg}"
    texts = [(float(t.get("x")), float(t.get("y")), t.text, t.get("text-anchor", "start")) for t in svg.iter(ns + "text")
             if not t.get("transform")]  # all but the rotated axis title
    for x, y, s, anchor in texts:  # every label inside the picture (about 7 px a character)
        width = 7 * len(s)
        x0 = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
        assert 0 <= x0 and x0 + width <= W + 1 and 0 < y <= H, s
    assert "per_step: > 8x, fit > 8x" in [s for _, _, s, _ in texts]
    ticks = sorted(x for x, y, s, _ in texts if s.isdigit() and y > H - 52)
    assert len(ticks) == 4 and min(b - a for a, b in zip(ticks, ticks[1:])) > 7 * 4  # size labels apart
    ylabels = sorted(y for x, y, s, anchor in texts if anchor == "end")
    assert min(b - a for a, b in zip(ylabels, ylabels[1:])) >= 14                   # error labels apart
    plot_right = max(ticks) + 0.25 / math.log(2) * (ticks[1] - ticks[0]) + 1
    assert all(float(c.get("cx")) <= plot_right for c in svg.iter(ns + "circle") if c.get("data-method"))
    arrows = {p.get("data-method") for p in svg.iter(ns + "path")}
    assert {"per_step", "per_step_oracle", "rft", "dpo"} <= arrows and "rft_budget" in arrows  # below the range: left


def scaling_args(n, out):
    cfg = sn.parse_config(MINI + ["--mode", "scaling", "--n_train", str(n), "--doublings", "2", "--seeds", "2",
                                  "--out", out, "--n_test", "2", "--max_new_tokens", "8", "--sft_steps", "2"])

    return cfg, sn.load_problems(cfg.train, n * 4), sn.load_problems(cfg.test, 2)


# ----------------------------------------------------------------------------------------------------------------
# Runs that survive SIGKILL
# ----------------------------------------------------------------------------------------------------------------

KILLABLE = r'''
"""python killable.py POINT N ARGS...: stepneg.main(ARGS) with a seeded fake sampler, SIGKILLed at the N-th call of
POINT (generate or step, an optimizer step): the hardest crash, no handler runs. POINT term sends SIGTERM at the N-th
generate call instead, as a scheduler pre-empting the job would."""
import os, random, signal, sys
import torch
import stepneg as sn
from test_stepneg import seeded_policy
point, at = sys.argv[1], int(sys.argv[2])
gold = {p["question"]: p["gold"] for f in os.environ["GOLD_FILES"].split(",") for p in sn.load_problems(f)}
calls = {"generate": 0, "step": 0}


def count(name):
    calls[name] += 1
    if point == name and calls[name] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "term" and name == "generate" and calls[name] == at:
        os.kill(os.getpid(), signal.SIGTERM)


real_generate = sn.generate


def policy(model, tok, prompts, temperature, max_new, seed):
    count("generate")
    if temperature == 0 and os.environ.get("REAL_GREEDY"):  # validation and evaluation decode with the real model
        return real_generate(model, tok, prompts, temperature, max_new, seed)
    return seeded_policy(gold, prompts, seed)


adam_step = torch.optim.AdamW.step
torch.optim.AdamW.step = lambda self, *a, **k: (count("step"), adam_step(self, *a, **k))[1]
sn.generate = policy
sn.cli(sys.argv[3:])
'''


def seeded_policy(gold, prompts, seed):
    """A sampler whose text follows its seed: right 60% of the time from x, 10% after a wrong first line "1 + 1 = 3",
    so every run has pairs at a pit; the runs that survive faults use it in place of generate."""
    rng, texts = random.Random(seed), []
    for p in prompts:
        question, prefix = p.split("Question: ", 1)[1].split("\nAnswer:\n", 1)
        ok = rng.random() < (0.1 if "= 3\n" in prefix else 0.6)
        first = "" if prefix else ("1 + 1 = 2\n" if rng.random() < 0.5 else "1 + 1 = 3\n")
        texts.append(first + ("3 + 3 = 6\nThe answer is " + gold[question] if ok else "3 + 3 = 7\nThe answer is -1"))
    return texts, [len(t) for t in texts], 0


def test_sigkilled_run_resumes_to_the_same_pairs_weights_and_metrics(tmp_path):
    """One miniature per-step run killed four times (mid-SFT training, mid-sampling, mid-rollouts, mid-DPO
    training) and stopped once by SIGTERM, each time restarted with the same command, against one uninterrupted
    run."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    (tmp_path / "killable.py").write_text(KILLABLE)
    env = {**os.environ, "PYTHONPATH": HERE, "GOLD_FILES": f"{HERE}/data/arith/train.jsonl,{HERE}/data/arith/test.jsonl"}
    args = MINI + ["--mode", "per_step", "--sft_epochs", "3", "--dpo_epochs", "2", "--gen_batch", "8",
                   "--ckpt_every", "1"]

    def run(out, point="none", at=0):
        return subprocess.run([sys.executable, str(tmp_path / "killable.py"), point, str(at)] + args + ["--out", out],
                              env=env, capture_output=True, text=True)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert run(whole).returncode == 0
    kills = [("step", 4, lambda: os.path.exists(f"{cut}/sft/train_state.pt")),                 # mid-SFT
             ("generate", 3, lambda: os.path.exists(f"{cut}/samples/generations.jsonl")        # mid-sampling
              and not os.path.exists(f"{cut}/samples/done.json")),
             ("generate", 4, lambda: os.path.exists(f"{cut}/per_step/rollouts.jsonl")          # mid-rollouts
              and not os.path.exists(f"{cut}/per_step/pairs.jsonl")),
             ("generate", 2, lambda: not os.path.exists(f"{cut}/per_step/pairs.jsonl")),       # mid-rollouts again
             ("step", 2, lambda: os.path.exists(f"{cut}/per_step/train_state.pt"))]            # mid-DPO
    for point, at, where in kills:
        assert run(cut, point, at).returncode == -9 and where(), (point, at)
        if point == "generate" and at == 4:  # this time a polite SIGTERM: exit 130 and the command that resumes
            term = run(cut, "term", 1)
            assert term.returncode == 130 and "Resume with the same command" in term.stderr
            assert f"--out {cut}" in term.stderr.splitlines()[-1]
    assert run(cut).returncode == 0
    assert open(f"{whole}/samples/samples.jsonl", "rb").read() == open(f"{cut}/samples/samples.jsonl", "rb").read()
    # Equal up to float noise, not bitwise: MKL's CPU matmuls may round the last bit differently from one process to
    # the next (CI once saw one reference log-prob of 12 differ by one ulp, 4e-6). A real resume fault (a lost or
    # repeated optimizer step, reference log-probs from the wrong weights) moves weights by ~lr and log-probs by far
    # more than these bounds.
    ref = ["ref_chosen_logps", "ref_rejected_logps"]
    pa, pb = sn.read_jsonl(f"{whole}/per_step/pairs.jsonl"), sn.read_jsonl(f"{cut}/per_step/pairs.jsonl")
    assert pa and [{k: v for k, v in p.items() if k not in ref} for p in pa] == \
        [{k: v for k, v in p.items() if k not in ref} for p in pb]
    assert all(abs(p[k] - q[k]) < 1e-4 for p, q in zip(pa, pb) for k in ref)
    for m in ["sft", "per_step"]:
        a, b = load_file(f"{whole}/{m}/model/model.safetensors"), load_file(f"{cut}/{m}/model/model.safetensors")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), m
    for name in ["eval_sft", "eval_per_step"]:
        assert sn.stage_done(sn.Config(out=whole), name)["accuracy"] == sn.stage_done(sn.Config(out=cut), name)["accuracy"]


def test_cached_rows_from_other_weights_are_not_reused(tmp_path):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, gen_batch=4, max_new_tokens=8)
    model, tok = sn.load_model(cfg, "tiny")
    rows = [(str(i), f"Question: {i}\nAnswer:\n") for i in range(6)]
    path = str(tmp_path / "gen.jsonl")
    sn.cached_generate(model, tok, rows, cfg, path, 0, "a")
    _, again = sn.cached_generate(model, tok, rows, cfg, path, 0, "a")
    assert again["new_tokens"] == 0                                   # same weights and settings: all reused
    with torch.no_grad():
        next(model.parameters()).add_(0.01)                           # "the SFT stage was redone"
    _, other = sn.cached_generate(model, tok, rows, cfg, path, 0, "a")
    assert other["new_tokens"] > 0 and other["tokens"] == other["new_tokens"]
    _, hotter = sn.cached_generate(model, tok, rows, cfg, path, 0, "a", temperature=1.3)
    assert hotter["new_tokens"] > 0                                   # other sampling settings: regenerated too


def test_a_finished_stage_whose_outputs_changed_is_redone(tmp_path):
    out = str(tmp_path / "run")
    sn.main(MINI + ["--mode", "sft", "--out", out])
    cfg = sn.Config(out=out)
    assert sn.stage_done(cfg, "sft") and sn.stage_done(cfg, "eval_sft")
    with open(f"{out}/eval_sft/responses.jsonl", "a") as f:
        f.write("{}\n")
    assert sn.stage_done(cfg, "eval_sft") is None and sn.stage_done(cfg, "sft")
    sn.main(MINI + ["--mode", "per_step", "--out", out])                # redoes eval_sft only
    assert [json.loads(x)["stage"] for x in open(f"{out}/metrics.jsonl")].count("sft") == 1
    os.remove(f"{out}/sft/model/model.safetensors")
    assert sn.stage_done(cfg, "sft") is None
    sn.main(MINI + ["--mode", "sft", "--out", out])                     # SFT redone: all made from it is stale
    assert sn.stage_done(cfg, "sft") and all(sn.stage_done(cfg, s) is None for s in ("samples", "per_step",
                                                                                         "eval_per_step"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=2, ckpt_every=1, log_every=100)
    model, tok = sn.load_model(cfg, "tiny")
    data = [{"question": f"{i} + 1?", "response": f"{i} + 1 = {i + 1}\nThe answer is {i + 1}"} for i in range(8)]
    calls, real = {"n": 0}, sn.sft_loss

    def nan_at_third(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(sn, "sft_loss", nan_at_third)
    ckpt = str(tmp_path / "train_state.pt")
    with pytest.raises(FloatingPointError, match="sft-test: the loss became nan"):
        sn.train_sft(model, tok, data, cfg, 1, 1e-3, "sft-test", ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_lora_starts_as_the_base_trains_only_adapters_and_saves_merged(tmp_path):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=4, dpo_epochs=4, dpo_lr=1e-2, log_every=100,
                    lora_rank=4, grad_ckpt=True)
    model, tok = sn.load_model(cfg, "tiny")
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    before = model(input_ids=ids).logits
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [{"prompt": "Question: 2+2?\nAnswer:\n", "chosen": "2 + 2 = 4\nThe answer is 4", "rejected": "2 + 2 = 5\n",
              "rejected_complete": False}] * 4
    log = sn.train_dpo(model, tok, pairs, cfg, "lora-test")["log"]
    assert log[-1]["loss"] < math.log(2)
    lora = {name: m for name, m in model.named_modules() if isinstance(m, sn.LoRALinear)}
    assert len(lora) == 7  # q, k, v, o, gate, up, down of the one layer
    assert all(torch.equal(m.base.weight, frozen[name + ".weight"]) for name, m in lora.items())  # base untouched
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, before)
    sn.save_model(model, tok, str(tmp_path / "merged"))
    merged, _ = sn.load_model(sn.Config(), str(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)
    assert not any(isinstance(m, sn.LoRALinear) for m in merged.modules())


def test_bf16_weights_take_updates_smaller_than_their_resolution():
    """lr 1e-6, 200 steps of a steady gradient on a bf16 layer: plain AdamW rounds every update away; through fp32
    masters the layer ends where an fp32 run with the same gradients ends, up to one rounding."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64, bias=False) for _ in range(3)]  # fp32, bf16 with masters, plain bf16
    torch.nn.init.normal_(layers[0].weight, std=0.02)
    with torch.no_grad():
        layers[0].weight.copy_(layers[0].weight.to(torch.bfloat16))
        for m in layers[1:]:
            m.to(torch.bfloat16).weight.copy_(layers[0].weight)
    start = layers[0].weight.detach().clone()
    (o1, s1), (o2, s2) = sn.make_optimizer(layers[0], 1e-6, 200), sn.make_optimizer(layers[1], 1e-6, 200)
    plain = torch.optim.AdamW(layers[2].parameters(), lr=1e-6, weight_decay=0.0)
    assert len(o1.masters) == 0 and len(o2.masters) == 1
    g = torch.randn(64, 64) * 1e-3
    for _ in range(200):
        for m in layers:
            m.weight.grad = g.to(m.weight.dtype)
        sn.optimizer_step(o1, s1), sn.optimizer_step(o2, s2), plain.step()
    move = (layers[0].weight - start).abs().mean()
    lost = [((m.weight.float() - layers[0].weight).abs().mean() / move).item() for m in layers[1:]]
    assert lost[0] < 0.4 and lost[1] > 0.9, lost  # measured 0.26 (the last rounding) and 0.99
    assert torch.allclose(o2.masters[0][1], layers[0].weight, rtol=0, atol=1e-7)
    assert torch.equal(layers[1].weight, o2.masters[0][1].to(torch.bfloat16))


def test_bench_shapes_runs_every_stage_of_a_small_shape(tmp_path):
    train = sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"), 20)
    cfg = sn.Config(out=str(tmp_path), device="cpu", max_new_tokens=6, rollouts=2, batch_size=8)
    shape = {"small": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=700)}
    rows = sn.bench_shapes(cfg, train, shape)
    assert [r["what"] for r in rows] == ["build", "sampling", "rollouts", "reference log-probs",
                                        "per-step DPO, LoRA r = 16, batch 8", "per-step DPO, full fine-tuning, batch 8"]
    assert rows[1]["new_tokens"] > 0 and rows[2]["new_tokens"] > 0 and all(r["peak_gib"] > 0 for r in rows[1:])
    assert all(r["pairs_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows[4:])
    saved = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["what"] for r in saved if r["stage"] == "bench_shapes"] == [r["what"] for r in rows]


def test_memory_estimate_of_a_7b_shaped_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000)).to(torch.bfloat16)
    full, ckpt = sn.memory_estimate(model, 8, 512, False), sn.memory_estimate(model, 8, 512, True)
    assert abs(full["weights"] - 6.738e9 * 2 / 2 ** 30) < 0.05 and abs(full["optimizer"] - 6 * full["gradients"]) < 0.01
    assert ckpt["activations"] < full["activations"] / 10
    sn.add_lora(model, 8)
    assert sn.memory_estimate(model, 8, 512, True)["gradients"] < 0.05  # adapters only: ~20M parameters


def test_a_7b_full_fine_tune_fits_80gb_gpus_sharded_over_8_not_under_ddp(monkeypatch):
    """The README's 7B command (DeepSeek-Math-7B's shapes, 8 processes): the line each training stage prints. Data
    parallel needs ~100 GiB a process before activations; sharded over 8, the same run fits an 80 GB GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                                             num_attention_heads=32, vocab_size=102400)).to(torch.bfloat16)
    monkeypatch.setattr(sn, "WORLD", 8)
    cfg = sn.Config(shard=True, grad_ckpt=True, batch_size=64, micro_batch=4, max_len=1024)
    total = {}
    for shard in (False, True):
        for desc, per_example in (("sft", 1), ("per_step", 2)):
            line = sn.memory_line(model, dataclasses.replace(cfg, shard=shard), desc, per_example)
            print(line)
            total[shard, desc] = float(line.rsplit("total ", 1)[1])
            assert ("sharded over 8" in line) == shard and "gathered" in line if shard else "gathered" not in line
    assert total[False, "sft"] > 100 and total[False, "per_step"] > 100
    assert total[True, "sft"] < 40 and total[True, "per_step"] < 60
    weights = sn.memory_estimate(model, 4, 1024, True, shards=8)["weights"]
    assert abs(weights * 8 - sn.memory_estimate(model, 4, 1024, True)["weights"]) < 0.01


def test_shard_refuses_a_single_process_lora_and_a_model_without_decoder_layers(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="--shard .*torchrun --nproc_per_node N"):
        sn.main(MINI + ["--shard", "true", "--out", str(tmp_path / "one")])
    with pytest.raises(SystemExit):
        sn.main(MINI + ["--shard", "true", "--lora_rank", "4", "--out", str(tmp_path / "lora")])
    assert "--shard with --lora_rank" in capsys.readouterr().err
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
    monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", None)  # a model that names no repeated block
    with pytest.raises(SystemExit, match="--shard: no decoder layers found in LlamaForCausalLM"):
        sn.load_model(sn.Config(d_model=32, n_layers=1, n_heads=2, shard=True), "tiny")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_micro_batches_make_the_same_update_as_the_whole_batch(stage):
    weights = []
    for micro in (0, 3):
        cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, batch_size=8, micro_batch=micro, sft_steps=2,
                        dpo_epochs=1, dpo_lr=1e-3, log_every=100)
        model, tok = sn.load_model(cfg, "tiny")
        if stage == "sft":
            data = [{"question": f"{i} + {i}?", "response": f"{i} + {i} = {2 * i}\nThe answer is {2 * i}"} for i in range(8)]
            sn.train_sft(model, tok, data, cfg, 1, 1e-3, "sft-micro")
        else:
            pairs = [{"prompt": f"Question: {i}?\nAnswer:\n", "chosen": f"{i} = {i}\nThe answer is {i}",
                      "rejected": f"{i} = {i + 1}" * (1 + i % 3) + "\n", "rejected_complete": False} for i in range(8)]
            sn.train_dpo(model, tok, pairs, cfg, "dpo-micro")
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_synth_mode_writes_d_syn_from_the_teachers_correct_samples(tmp_path, monkeypatch):
    problems = sn.load_problems(os.path.join(HERE, "data/arith/train.jsonl"), 12)
    gold = {p["question"]: p["gold"] for p in problems}

    def teacher(model, tok, prompts, temperature, max_new, seed):  # solves every other problem, on its 2nd sample
        texts = []
        for k, p in enumerate(prompts):
            q = p.split("Question: ")[1].split("\nAnswer:")[0]
            solved = list(gold).index(q) % 2 == 0 and k % 2 == 1
            texts.append(f"3 + 4 = 7\nThe answer is {gold[q] if solved else 'none'}")
        return texts, [1] * len(texts), 0
    monkeypatch.setattr(sn, "generate", teacher)
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2)
    model, tok = sn.load_model(cfg, "tiny")
    sn.save_model(model, tok, str(tmp_path / "teacher"))
    out = str(tmp_path / "run")
    sn.main(MINI + ["--mode", "synth", "--teacher", str(tmp_path / "teacher"), "--out", out])
    d_syn = sn.load_problems(f"{out}/synth/train.jsonl")
    assert [p["question"] for p in d_syn] == [p["question"] for p in problems[::2]]
    assert all(sn.reward(p["response"], p["gold"]) for p in d_syn)
    with pytest.raises(SystemExit, match="--teacher"):
        sn.main(MINI + ["--mode", "synth", "--out", out + "2"])


def test_torchrun_two_cpu_processes_match_one_with_ddp_and_with_shard(tmp_path):
    """torchrun --nproc_per_node 2 on the gloo backend, data parallel (DDP) and sharded (--shard: FSDP2): sampling
    batches shared out and gathered, every training batch split across the ranks (uneven shares included), validation
    decoding on gathered weights. Every training stage (SFT with validation, RFT, outcome DPO, per-step DPO, AWR) must
    match one process: the same samples and pairs, the same loss at every step and the same weights up to float
    rounding, the same accuracies. Then a sharded run is SIGKILLed mid-SFT and mid-RFT and resumed (the second time in
    one process): it ends with the uninterrupted sharded run's pairs, losses and weights."""
    import subprocess
    import sys
    from safetensors.torch import load_file
    (tmp_path / "killable.py").write_text(KILLABLE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE, "REAL_GREEDY": "1",
           "GOLD_FILES": f"{HERE}/data/arith/train.jsonl,{HERE}/data/arith/test.jsonl"}
    args = MINI + ["--mode", "all", "--loss", "both", "--n_train", "13", "--val", "4", "--sft_epochs", "2",
                   "--gen_batch", "8", "--micro_batch", "3", "--log_every", "1", "--ckpt_every", "1"]

    def run(out, procs=1, point="none", at=0, *extra):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
        return subprocess.run([sys.executable, *launch, str(tmp_path / "killable.py"), point, str(at), *args, *extra,
                               "--out", out], cwd=HERE, env=env, capture_output=True, text=True)
    one, ddp, shard, cut = (str(tmp_path / name) for name in ("one", "ddp", "shard", "cut"))
    assert run(one).returncode == 0
    for out, extra in ((ddp, []), (shard, ["--shard", "true"])):
        done = run(out, 2, "none", 0, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert os.path.exists(f"{out}/rank1.log")  # the second rank ran, quietly
        assert ("sharded over 2" in done.stdout) == bool(extra)
    stages = ["sft", "rft", "dpo", "per_step", "per_step_awr"]

    def same(a, b):
        ref = ("ref_chosen_logps", "ref_rejected_logps")  # pi_sft's, whose weights differ by float rounding
        for f in ["samples/samples.jsonl", "dpo/pairs.jsonl", "per_step/pairs.jsonl", "per_step_awr/examples.jsonl"]:
            ra, rb = sn.read_jsonl(f"{a}/{f}"), sn.read_jsonl(f"{b}/{f}")
            assert ra and [{k: v for k, v in r.items() if k not in ref} for r in ra] == \
                [{k: v for k, v in r.items() if k not in ref} for r in rb], f
            assert all(abs(p[k] - q[k]) < 1e-4 for p, q in zip(ra, rb) for k in ref if k in p), f
        for stage in stages:
            da, db = (json.load(open(f"{d}/{stage}/done.json")) for d in (a, b))
            assert [r["step"] for r in da["log"]] == [r["step"] for r in db["log"]] and len(da["log"]) >= 2, stage
            assert [r["loss"] for r in da["log"]] == pytest.approx([r["loss"] for r in db["log"]], rel=1e-4, abs=1e-4)
            assert da.get("val_log") == db.get("val_log"), stage
            wa, wb = (load_file(f"{d}/{stage}/model/model.safetensors") for d in (a, b))
            assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa), stage
        acc = [[json.loads(line).get("accuracy") for line in open(f"{d}/metrics.jsonl")] for d in (a, b)]
        assert acc[0] == acc[1]
    same(one, ddp)
    same(one, shard)
    # SIGKILL both ranks at SFT's 3rd optimizer step (its train_state and best.pt written by the 2nd); rerun, sharded,
    # SIGKILLed again mid-RFT (the resumed SFT's 2 steps, then RFT's 3rd); the rest in one process, from the sharded
    # run's RFT checkpoint (written whole, so either resumes the other's)
    assert run(cut, 2, "step", 3, "--shard", "true").returncode != 0 and os.path.exists(f"{cut}/sft/train_state.pt")
    killed = run(cut, 2, "step", 5, "--shard", "true")
    assert killed.returncode != 0 and "resuming" in killed.stdout and os.path.exists(f"{cut}/rft/train_state.pt")
    resumed = run(cut)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    same(shard, cut)


def test_lora_starts_exactly_as_the_base():
    model, tok = tiny_lm()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        sn.add_lora(model, 4)
        assert torch.equal(model(input_ids=ids).logits, before)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    layer = torch.nn.Linear(2, 2)
    opt, sched = sn.make_optimizer(layer, 1.0, 40)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        layer.weight.grad = torch.ones_like(layer.weight)
        sn.optimizer_step(opt, sched)
    warm = 2  # 5% of 40 steps
    assert lrs == pytest.approx([(s + 1) / warm if s < warm else (40 - s) / (40 - warm) for s in range(40)])


def test_gradients_are_clipped_to_norm_one_before_the_step():
    layer = torch.nn.Linear(4, 4, bias=False)
    opt, sched = sn.make_optimizer(layer, 1e-3, 10)
    norms = []
    opt.register_step_pre_hook(lambda o, *_: norms.append(torch.cat([p.grad.flatten() for p in o.param_groups[0]["params"]])
                                                          .norm().item()))
    for scale in (100.0, 0.5):
        layer.weight.grad = torch.full((4, 4), scale / 4)  # norm = scale
        sn.optimizer_step(opt, sched)
    assert norms == pytest.approx([1.0, 0.5], rel=1e-5)


def test_fp32_masters_come_back_on_resume(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    opt, sched = sn.make_optimizer(layer, 1e-4, 50)
    for _ in range(5):
        layer.weight.grad = torch.randn(16, 16).to(torch.bfloat16)
        sn.optimizer_step(opt, sched)
    master = opt.masters[0][1].clone()
    assert not torch.equal(master, layer.weight.float())  # the bits bf16 rounded off
    sn.save_train_state(str(tmp_path / "state.pt"), layer, opt, sched, 5, {})
    fresh = torch.nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    opt2, sched2 = sn.make_optimizer(fresh, 1e-4, 50)
    assert sn.load_train_state(str(tmp_path / "state.pt"), fresh, opt2, sched2, {}) == 5
    assert torch.equal(opt2.masters[0][1], master) and torch.equal(fresh.weight, layer.weight)


def test_cached_rows_are_redone_for_another_seed_or_length(tmp_path):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, gen_batch=4, max_new_tokens=8)
    model, tok = sn.load_model(cfg, "tiny")
    rows = [(str(i), f"Question: {i}\nAnswer:\n") for i in range(6)]
    path = str(tmp_path / "gen.jsonl")
    sn.cached_generate(model, tok, rows, cfg, path, 0, "a")
    assert sn.cached_generate(model, tok, rows, cfg, path, 0, "a")[1]["new_tokens"] == 0
    assert sn.cached_generate(model, tok, rows, cfg, path, 1, "a")[1]["new_tokens"] > 0
    longer = sn.Config(d_model=32, n_layers=1, n_heads=2, gen_batch=4, max_new_tokens=9)
    assert sn.cached_generate(model, tok, rows, longer, path, 1, "a")[1]["new_tokens"] > 0


# Every setting that changes what a stage computes must be refused against a folder made with another value.
NOT_RESULTS = {"mode", "loss", "audit", "out", "device", "shard", "log_every", "ckpt_every", "doublings", "seeds", "size_epochs"}


def test_every_result_setting_is_checked_against_an_existing_folder(tmp_path):
    sn.check_out_folder(sn.Config(out=str(tmp_path)))
    for f in dataclasses.fields(sn.Config):
        if f.name == "out":
            continue
        value = f.default
        other = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float))
                 else value + "-other")
        cfg = dataclasses.replace(sn.Config(out=str(tmp_path)), **{f.name: other})
        if f.name in NOT_RESULTS:
            sn.check_out_folder(cfg)
            sn.check_out_folder(sn.Config(out=str(tmp_path)))
        else:
            with pytest.raises(SystemExit, match=f"--{f.name} "):
                sn.check_out_folder(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The star graph (--task star)
# ----------------------------------------------------------------------------------------------------------------

STAR_Q = "Edges: 7 > 31, 12 > 40, 5 > 7, 40 > 3, 5 > 12, 31 > 9. Path from 5 to 3?"


def test_star_graphs_are_deterministic_disjoint_and_say_nothing_of_the_path_by_order():
    assert sn.make_toy_data("star", n_train=50, n_test=10) == sn.make_toy_data("star", n_train=50, n_test=10)
    D, L = sn.STAR["degree"], sn.STAR["arm"]
    rng, first_listed, position = random.Random(1), 0, [0] * (D * L)
    problems = [sn.make_star_problem(rng) for _ in range(3000)]
    for p in problems:
        edges, start, goal = sn.star_graph(p["question"])
        nodes = [start] + [v for _, v in edges]
        assert len(edges) == D * L and len(set(nodes)) == len(nodes)  # every arm disjoint, no label twice
        path = [int(v) for v in sn.star_path(p["question"])]
        assert path[0] == start and path[-1] == goal and len(path) == L + 1 and all(e in edges for e in zip(path, path[1:]))
        assert not any(u == goal for u, _ in edges)  # the goal ends an arm
        assert p["answer"] == " > ".join(map(str, path)) and sn.reward(p["response"], p["answer"]) == 1
        assert sn.first_wrong_step(sn.split_steps(p["response"]), p["question"]) is None
        first_listed += [v for u, v in edges if u == start][0] == path[1]
        position[edges.index((path[0], path[1]))] += 1
    assert abs(first_listed / len(problems) - 1 / D) < 0.04  # the start's first listed child is the path's 1/D of the time
    assert all(abs(c / len(problems) - 1 / (D * L)) < 0.04 for c in position)  # the first edge anywhere in the list


def test_star_truth_on_hand_made_answers_and_the_ordered_path_check():
    assert sn.star_path(STAR_Q) == ["5", "12", "40", "3"] and sn.has_truth(STAR_Q) and sn.toy_chain(STAR_Q) is None
    wrong = lambda text: sn.first_wrong_step(sn.split_steps(text), STAR_Q)  # noqa: E731
    assert wrong("5 > 12\n12 > 40\n40 > 3\nThe answer is 5 > 12 > 40 > 3") is None
    assert wrong("5 > 7\n7 > 31\n31 > 9\nThe answer is 5 > 7 > 31 > 9") == 1      # the wrong arm: the plan
    assert wrong("5 > 12\n12 > 31\n31 > 9\nThe answer is 5 > 12 > 31 > 9") == 2   # a look-up gone wrong
    assert wrong("5 > 12\n12 > 40\n40 > 3\nThe answer is 5 > 40 > 12 > 3") == 4   # the answer line counts
    assert wrong("5 > 12\n12 > 40\n") == 3                                            # stops short
    assert sn.exact_rest(STAR_Q, ["5 > 12\n"]) == "12 > 40\n40 > 3\nThe answer is 5 > 12 > 40 > 3"
    assert sn.is_equiv("5 > 12 > 40 > 3", "5>12>40>3") and not sn.is_equiv("5 > 40 > 12 > 3", "5 > 12 > 40 > 3")
    assert not sn.is_equiv("5, 12, 40, 3", "5 > 12 > 40 > 3") and not sn.is_equiv("5 > 12 > 40", "5 > 12 > 40 > 3")
    assert sn.reward("5 > 7\n7 > 31\nThe answer is 5 > 12 > 40 > 3", "5 > 12 > 40 > 3") == 1  # the answer decides
    report = sn.star_edges_report([{"question": STAR_Q}] * 3, [
        "5 > 12\n12 > 40\n40 > 3\nThe answer is 5 > 12 > 40 > 3",  # right
        "5 > 7\n7 > 31\n31 > 9\nThe answer is 5 > 7 > 31 > 9",      # the wrong arm, followed faithfully
        "5 > 12\n40 > 3\n3 > 8\nThe answer is 5 > 12 > 3"])          # jumps, then an edge not in the graph
    assert report == {"first_edge": round(2 / 3, 4), "follows_graph": round(4 / 6, 4)}


def test_star_tokenizer_spells_every_label_as_one_token_and_leaves_the_others_alone():
    tok, text = sn.tiny_tokenizer("star"), sn.PROMPT.format(question=STAR_Q) + "5 > 12\nThe answer is 5 > 12"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(tok.convert_ids_to_tokens(tok(f"{v} > {v}", add_special_tokens=False)["input_ids"]) == [f"{v}Ġ>Ġ", str(v)]
               for v in range(1, sn.STAR["labels"] + 1))  # an edge is two tokens: "12 > " and "40"
    assert len(sn.tiny_tokenizer()) == len(sn.tiny_tokenizer("arith")) < len(tok)  # the other tasks' vocabulary unchanged


def test_star_base_corpus_asks_only_for_look_ups():
    for row in sn.star_base_corpus(0, 200):
        q = row["question"]
        edges = [tuple(map(int, e.split(" > "))) for e in q.split("Edges: ")[1].split(". Follow")[0].split(", ")]
        start = int(q.rsplit(" ", 1)[1].rstrip("."))
        path = [int(v) for v in row["response"].split("The answer is ")[1].split(" > ")]
        assert len(edges) == sn.STAR["degree"] * sn.STAR["arm"] and path[0] == start and len(path) == len(edges) + 1
        assert all(e in edges for e in zip(path, path[1:])) and row["response"] == sn.star_solution(path)
        assert all(sum(u == v for u, _ in edges) <= 1 for v in path)  # one way on from every node: no plan needed


def test_star_miniature_run_has_every_method_the_first_edge_and_the_truth(tmp_path, capsys):
    train, test = sn.make_toy_data("star", n_train=16, n_test=6)
    sn.write_jsonl(str(tmp_path / "train.jsonl"), train), sn.write_jsonl(str(tmp_path / "test.jsonl"), test)
    args = MINI[2:] + ["--task", "star", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"),
                       "--base_steps", "2", "--val", "4", "--max_new_tokens", "40", "--temperature", "2.0",
                       "--out", str(tmp_path / "run")]
    sn.main(args + ["--mode", "all", "--seeds", "2"])
    out = capsys.readouterr().out
    for seed in (0, 1):
        run = sn.Config(out=str(tmp_path / "run" / f"seed{seed}"))
        for stage in ("sft", "rft", "dpo", "per_step", "per_step_awr", "per_step_oracle"):
            ev = sn.stage_done(run, f"eval_{stage}")
            assert ev and 0 <= ev["first_edge"] <= 1 and 0 <= ev["follows_graph"] <= 1, stage
        rows = sn.read_jsonl(f"{run.out}/eval_sft/responses.jsonl")
        assert all(r["first_edge"] in (0, 1) for r in rows)
        assert sn.stage_done(run, "per_step")["pairs"] == 0 or os.path.exists(f"{run.out}/per_step/truth.json")
    assert "First edge right (1/2 by guessing)" in open(tmp_path / "run" / "seeds.md").read()
    assert "first edge" in out and os.path.exists(tmp_path / "run" / "base" / "model")


def test_the_shipped_star_base_follows_chains_and_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)
    info = json.load(open("data/star/base/base.json"))
    assert info["settings"] == {**{k: getattr(sn.Config, k) for k in sn.BASE_KEYS}, "base_steps": 4000}
    cfg = sn.parse_config(["--task", "star", "--out", str(tmp_path / "run")])
    assert (cfg.base_steps, cfg.loss, cfg.n_train, cfg.val, cfg.sft_epochs) == (4000, "both", 7700, 300, 2)
    assert sn.run_base(cfg).model == sn.SHIPPED_BASE["star"]
    model, tok = sn.load_model(cfg, sn.SHIPPED_BASE["star"])
    skill = sn.base_skill(model, tok, cfg, n=200)  # fresh chains of six shuffled edges, followed whole
    assert info["fresh_lists_right"] >= 0.9 and abs(skill - info["fresh_lists_right"]) <= 0.05


# ----------------------------------------------------------------------------------------------------------------
# Faults beyond SIGKILL: a write that fails halfway, a damaged cache
# ----------------------------------------------------------------------------------------------------------------


def test_a_write_that_fails_halfway_stops_clearly_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """ENOSPC injected after part of a write's bytes are on disk: into each kind of write the run makes (a cache append,
    a whole file such as done.json or pairs, a model save, a training checkpoint) at a random call, and, in a second
    run, at a random write of each stage. Every time the run stops with one line naming the file, and the same command
    then finishes with the bytes of an uninterrupted run (in one process; the SIGKILL test allows float noise)."""
    import builtins
    import errno
    import transformers
    args = MINI + ["--mode", "per_step", "--sft_epochs", "3", "--dpo_epochs", "2", "--gen_batch", "8", "--ckpt_every", "1"]
    whole, by_kind, by_stage = (str(tmp_path / d) for d in ("whole", "by_kind", "by_stage"))
    gold = {p["question"]: p["gold"] for f in ("train", "test") for p in sn.load_problems(f"{HERE}/data/arith/{f}.jsonl")}
    calls, real_open, real_save, real_pretrained = {}, builtins.open, torch.save, transformers.PreTrainedModel.save_pretrained

    def inject(match, at):  # the at-th write that match(kind, path) picks fails halfway; at = 0: none does
        calls.clear()

        def hit(kind, path):
            if not match(kind, str(path)):
                return False
            calls["n"] = calls.get("n", 0) + 1
            return calls["n"] == at

        class Half:  # a file whose write stops halfway, as a full disk stops it
            def __init__(self, f):
                self.f = f

            def write(self, text):
                self.f.write(text[:len(text) // 2]), self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

            def writelines(self, lines):
                self.write("".join(lines))

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fake_open(path, mode="r", *a, **k):
            f = real_open(path, mode, *a, **k)
            return Half(f) if ("a" in mode or "w" in mode) and hit("append" if "a" in mode else "whole", path) else f

        def fake_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if hit("checkpoint", path):
                os.truncate(path, os.path.getsize(path) // 2)
                raise RuntimeError(f"[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file {path}")

        def fake_pretrained(self, folder, *a, **k):
            real_pretrained(self, folder, *a, **k)
            if hit("model", folder):
                weights = os.path.join(folder, "model.safetensors")
                os.truncate(weights, os.path.getsize(weights) // 2)
                raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(sn, "generate", lambda model, tok, prompts, t, m, seed: seeded_policy(gold, prompts, seed))
        monkeypatch.setattr(sn, "open", fake_open, raising=False)
        monkeypatch.setattr(sn.torch, "save", fake_save)
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fake_pretrained)
    written = []
    inject(lambda kind, path: written.append(path) and False, 0)  # the uninterrupted run, its writes listed
    sn.cli(args + ["--out", whole])
    stages = ["sft", "eval_sft", "samples", "per_step", "eval_per_step"]
    per_stage = {s: sum(p.startswith(f"{whole}/{s}/") for p in written) for s in stages}
    assert all(per_stage.values()), per_stage
    rng = random.Random(0)
    faults = [(by_kind, lambda k, p, kind=kind: k == kind, rng.randint(1, most))
              for kind, most in [("checkpoint", 4), ("append", 6), ("whole", 10), ("model", 1), ("append", 3), ("whole", 4)]]
    faults += [(by_stage, lambda k, p, s=s: p.startswith(f"{by_stage}/{s}/"), rng.randint(1, per_stage[s])) for s in stages]
    for out, match, at in faults:
        inject(match, at)
        with pytest.raises(SystemExit) as stop:
            sn.cli(args + ["--out", out])
        assert "could not write" in str(stop.value) and out in str(stop.value) and "rerun the same command" in str(stop.value)
    for out in (by_kind, by_stage):
        inject(lambda kind, path: False, 0)
        sn.cli(args + ["--out", out])
        assert sn.read_jsonl(f"{whole}/per_step/pairs.jsonl")  # the comparison below has pairs and DPO steps in it
        for f in ["samples/samples.jsonl", "per_step/pairs.jsonl", "eval_sft/responses.jsonl",  # (caches may differ)
                  "eval_per_step/responses.jsonl", "sft/model/model.safetensors", "per_step/model/model.safetensors"]:
            assert open(f"{whole}/{f}", "rb").read() == open(f"{out}/{f}", "rb").read(), (out, f)  # byte for byte


def test_a_damaged_line_in_the_middle_of_a_cache_is_named_and_redone(tmp_path, capsys):
    cfg = sn.Config(d_model=32, n_layers=1, n_heads=2, gen_batch=2, max_new_tokens=6)
    model, tok = sn.load_model(cfg, "tiny")
    rows, path = [(str(i), f"Question: {i}\nAnswer:\n") for i in range(6)], str(tmp_path / "gen.jsonl")
    first, _ = sn.cached_generate(model, tok, rows, cfg, path, 0, "gen")
    lines = open(path).read().splitlines(keepends=True)
    lines[2] = lines[2][:10] + "#garbage\n"  # the third row (batch 1) damaged, whole rows after it
    open(path, "w").write("".join(lines))
    again, st = sn.cached_generate(model, tok, rows, cfg, path, 0, "gen")
    assert again == first and st["new_tokens"] > 0  # its batch redone, the same text
    assert f"{path}, line 3: not valid JSON" in capsys.readouterr().out
    assert all(json.loads(line) for line in open(path))  # the cache is clean again
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n{}\n{x\n{}\n")
    with pytest.raises(ValueError, match="line 3: not valid JSON"):  # user data stays strict
        sn.read_jsonl(str(data))


def test_a_damaged_or_foreign_training_checkpoint_is_refused_with_the_fix(tmp_path):
    args = MINI + ["--mode", "sft", "--sft_epochs", "2", "--ckpt_every", "1"]
    ckpt = tmp_path / "run" / "sft" / "train_state.pt"
    narrow, _ = sn.load_model(sn.Config(d_model=16, n_layers=1, n_heads=2), "tiny")
    opt, sched = sn.make_optimizer(narrow, 1e-3, 10)
    ckpt.parent.mkdir(parents=True)
    sn.save_train_state(str(ckpt), narrow, opt, sched, 1, {})                  # another model's, copied in
    with pytest.raises(SystemExit, match=rf"{ckpt}: a training checkpoint this run cannot resume from .*rm {ckpt}"):
        sn.main(args + ["--out", str(tmp_path / "run")])
    ckpt.write_bytes(ckpt.read_bytes()[:1000])                                 # torn
    with pytest.raises(SystemExit, match=rf"{ckpt}: a training checkpoint this run cannot resume from"):
        sn.main(args + ["--out", str(tmp_path / "run")])
    same, _ = sn.load_model(sn.parse_config(args), "tiny")                      # this model's shapes, other settings
    opt, sched = sn.make_optimizer(same, 1e-3, 10)
    sn.save_train_state(str(ckpt), same, opt, sched, 1, {"made_by": "another run"})
    with pytest.raises(SystemExit, match=r"made with other settings or data.*rm "):
        sn.main(args + ["--out", str(tmp_path / "run")])
    ckpt.unlink()                                                              # the fix the message gives
    sn.main(args + ["--out", str(tmp_path / "run")])
    assert sn.stage_done(sn.Config(out=str(tmp_path / "run")), "sft")


def test_damaged_inputs_stop_with_one_line_naming_the_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(open(f"{HERE}/data/star/train.jsonl", "rb").read()[:3000])  # shipped data, truncated mid-line
    with pytest.raises(SystemExit, match=rf"{train}, line 16: not valid JSON"):
        sn.main(["--task", "star", "--mode", "sft", "--train", str(train), "--out", str(tmp_path / "run")])
    folder = tmp_path / "init"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):      # no weights
        (folder / name).write_bytes(open(f"{HERE}/data/bigstep/base/{name}", "rb").read())
    args = MINI + ["--mode", "eval", "--init", str(folder), "--out", str(tmp_path / "eval")]
    with pytest.raises(SystemExit, match=rf"{folder}: not a loadable model folder .*model.safetensors"):
        sn.main(args)
    (folder / "model.safetensors").write_bytes(open(f"{HERE}/data/bigstep/base/model.safetensors", "rb").read())
    (folder / "tokenizer.json").unlink(), (folder / "tokenizer_config.json").unlink()  # no tokenizer
    with pytest.raises(SystemExit, match=rf"{folder}: not a loadable model folder"):
        sn.main(args)
